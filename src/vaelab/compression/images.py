"""What a codec reads and writes back: a dataset split (the IDX layout) or a folder (PNGs).

A split is the run's own data module's (so a run trained on dynamically binarized MNIST codes the
one seeded binarization of its test set); a folder's images are decoded as training decodes them
(resized, centre-cropped, composited onto the background), and those 8-bit images are what comes
back, byte for byte.
"""

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vaelab.errors import BadValue, MissingFile

SPLIT = re.compile(r"^(mnist|fashion_mnist):(train|val|test)$")
IDX_PREFIX = {"train": "train", "val": "val", "test": "t10k"}


@dataclass
class ImageSet:
    images: torch.Tensor           # uint8 [N, C, H, W]
    labels: torch.Tensor | None    # [N], where the source has them
    target: dict                   # where decompress writes them: {"idx": ...} or {"files": [...]}


def read(source: str, run_cfg: DictConfig, shape) -> ImageSet:
    """`mnist:test`, `fashion_mnist:val`, ... or a folder of images."""
    match = SPLIT.match(source)
    if match:
        return read_split(match.group(1), match.group(2), run_cfg)
    return read_folder(Path(source).expanduser(), run_cfg, shape)


def read_split(dataset: str, split: str, run_cfg: DictConfig) -> ImageSet:
    from vaelab import runs

    if run_cfg.data.get("_target_") != "vaelab.data.MNISTDataModule":
        raise BadValue(f"input={dataset}:{split} is a split of MNIST-like data and this run "
                       f"was trained on {run_cfg.data.get('_target_')}; give a folder of "
                       f"images instead")
    cfg = OmegaConf.merge(run_cfg, {"data": {"dataset": dataset, "corruption": None}})
    data = runs.load_split(cfg, split)
    return ImageSet(data.images.cpu(), data.labels.cpu(),
                    {"idx": f"{IDX_PREFIX[split]}-images-idx3-ubyte",
                     "idx_labels": f"{IDX_PREFIX[split]}-labels-idx1-ubyte"})


def read_folder(root: Path, run_cfg: DictConfig, shape) -> ImageSet:
    from vaelab.data.image_folder import decode, find_images

    if not root.is_dir():
        raise MissingFile(f"input={root} is neither a folder nor a split such as mnist:test")
    files = find_images(root)
    if not files:
        raise MissingFile(f"input={root} holds no images")
    channels, height, width = shape
    if height != width:
        raise BadValue(f"the model codes {height}x{width} images; folders are decoded square")
    background = tuple(run_cfg.data.get("background", (255, 255, 255)))
    names = [p.relative_to(root).with_suffix(".png").as_posix() for p in files]
    if len(set(names)) < len(names):
        twins = sorted({n for n in names if names.count(n) > 1})
        raise BadValue(f"{root} holds files that would come back under one name: {twins[:5]} "
                       f"(the same name with two extensions)")
    arrays = [decode(path, height, channels, background) for path in files]
    bad = [ascii(str(p)) for p, a in zip(files, arrays, strict=True) if a is None]
    if bad:
        raise BadValue(f"{len(bad)} files in {root} cannot be read as images, e.g. "
                       f"{', '.join(bad[:5])}; remove them or replace them")
    return ImageSet(torch.from_numpy(np.stack(arrays)), None, {"files": names})


def write(target: dict, images: torch.Tensor, labels: torch.Tensor | None,
          out: Path) -> list[Path]:
    """The images where the header says they go, each file whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "idx" in target:
        n, _, h, w = images.shape
        written.append(write_bytes(out / target["idx"], struct.pack(">4B3I", 0, 0, 8, 3, n, h, w)
                                   + images.numpy().tobytes()))
        if labels is not None:
            written.append(write_bytes(out / target["idx_labels"],
                                       struct.pack(">4BI", 0, 0, 8, 1, n)
                                       + labels.to(torch.uint8).numpy().tobytes()))
        return written
    for name, chw in zip(target["files"], images.numpy(), strict=True):
        path = out / name
        if out.resolve() not in path.resolve().parents:
            raise BadValue(f"the file names a path outside {out}: {name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0))
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        picture.save(partial, format="PNG")
        os.replace(partial, path)
        written.append(path)
    return written


def write_bytes(path: Path, data: bytes) -> Path:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return path
