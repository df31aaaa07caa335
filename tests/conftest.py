"""Shared fixtures: tiny generated IDX datasets and configs composed into tmp dirs."""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from vaelab.cli import config_dir

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite's workers share the cores: a thread each, for them and their subprocesses (two
    # processes with a thread per core each slow each other down many times over).
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
N_TRAIN, N_TEST = 96, 32
TINY = ["data.val_size=16", "data.batch_size=16", "data.eval_batch_size=16"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of MNIST: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(root: Path, name: str, seed: int) -> None:
    """Noisy blobs in 28x28 uint8 images with labels 0-9, in torchvision's raw layout."""
    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = rng.integers(0, 10, n)
        yy, xx = np.mgrid[:28, :28]
        images = np.zeros((n, 28, 28))
        for i, label in enumerate(labels):
            cx, cy = 8 + label, 10 + rng.integers(0, 8)
            images[i] = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (2 + label % 3) ** 2))
        noise = rng.integers(0, 30, images.shape)  # makes every image unique
        write_idx(raw / f"{split}-images-idx3-ubyte", np.round(images * 225) + noise)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_idx_dataset(root, "MNIST", seed=0)
    make_idx_dataset(root, "FashionMNIST", seed=1)
    return root


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Twelve small RGB PNGs in two class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(
            root / f"c{i % 2}" / f"{i}.png")
    return root


def compose_tool(name: str, *overrides: str):
    """The config of `python <name>.py <overrides>` (eval, generate), composed in-process."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def compose_train(data_dir, tmp_path):
    """compose_train(*overrides) -> the train config as `python train.py` would see it."""

    def _compose(*overrides: str, output_dir: Path = tmp_path, tiny: bool = True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            extra = TINY if tiny else []
            cfg = compose("train", overrides=[f"paths.data_dir={data_dir}", *extra, *overrides],
                          return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
        HydraConfig().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
