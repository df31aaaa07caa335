"""Find and load what a training run left behind: its checkpoint, its config, its data.

Every after-training tool (generate, eval) starts here, so a run is always read back the same way
and with the run's own saved config: nothing is re-declared.
"""

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab import loadable, schema
from vaelab.checkpointing import read_checkpoint
from vaelab.errors import BadValue, MissingFile
from vaelab.module import VAEModule


def resolve(run_dir: str | None, ckpt_path: str | None) -> tuple[Path, Path]:
    """(run dir, checkpoint): the best checkpoint named in metrics.json, else last.ckpt, both
    inside the run dir. A checkpoint elsewhere is used only when `ckpt_path=` names it."""
    if ckpt_path:
        ckpt = Path(ckpt_path).expanduser()
        if not ckpt.is_file():
            raise MissingFile(f"ckpt_path={ckpt} does not exist")
        run = Path(run_dir).expanduser() if run_dir else ckpt.resolve().parent.parent
        return run, ckpt
    if not run_dir:
        raise BadValue("give run_dir=<a train run's folder> or ckpt_path=<a .ckpt file>")
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise MissingFile(f"run_dir={run} does not exist")
    metrics = run / "metrics.json"
    best = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.is_file() else None
    for candidate in (best and run / best, run / "checkpoints" / "last.ckpt"):
        if not candidate or not candidate.is_file():
            continue
        if run.resolve() not in candidate.resolve().parents:
            raise MissingFile(
                f"{metrics} names {best}, outside {run} (a copied run dir?); give "
                f"ckpt_path= to use a checkpoint from elsewhere")
        return run, candidate
    raise MissingFile(f"no checkpoint in {run}/checkpoints: was the run trained?")


def run_config(run: Path) -> DictConfig:
    """The composed config the run was trained with (Hydra's .hydra/config.yaml)."""
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        raise MissingFile(f"{path} is missing: point run_dir at a folder made by train.py")
    config = schema.read_config(path)
    loadable.check_resolvers(OmegaConf.to_container(config, resolve=False), path)
    return config


def device(name: str) -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda`, `cuda:1`, ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise BadValue(f"device={name!r} is not a device; use auto, cpu or cuda") from err


def load_module(ckpt: Path, device_name: str = "cpu") -> tuple[VAEModule, int]:
    """The trained module in eval mode and the step it was saved at, loaded with
    weights_only=True (no pickled code runs). `device_name` may be `auto`."""
    checkpoint = read_checkpoint(ckpt)
    module = VAEModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(device(device_name)).eval(), int(checkpoint.get("global_step", 0))


def load_data(cfg: DictConfig):
    """The run's own DataModule, set up (a run dir is untrusted: its data spec is checked, then
    exactly what was checked is built)."""
    spec = OmegaConf.to_container(cfg.data, resolve=True)
    source = "the run's data config (.hydra/config.yaml)"
    loadable.check(spec, source)
    schema.validate(spec, schema.Data, source)
    datamodule = instantiate(spec)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def with_corruption(cfg: DictConfig, corruption: DictConfig | None) -> DictConfig:
    """The run's config with its data corrupted as `corruption` ({kind, strength}) says, where
    kind is set: a model trained on clean images, tested on the noise a denoising VAE saw."""
    if corruption is None or corruption.get("kind") is None:
        return cfg
    return OmegaConf.merge(cfg, {"data": {"corruption": corruption.kind,
                                          "corruption_strength": corruption.strength}})


def load_split(cfg: DictConfig, split: str):
    """One split (train / val / test) of the run's own DataModule."""
    datamodule = load_data(cfg)
    sets = {"train": "train_set", "val": "val_set", "test": "test_set"}
    if split not in sets:
        raise BadValue(f"split={split!r} is unknown; choose one of {list(sets)}")
    return getattr(datamodule, sets[split])


def take(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels at `indices`, stacked."""
    indices = [int(i) for i in indices]
    if bad := [i for i in indices if not 0 <= i < len(dataset)]:
        raise BadValue(f"indices {bad} are outside the split's {len(dataset)} images")
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    xs, ys = zip(*(dataset[i] for i in indices), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def batches(dataset, batch_size: int, limit: int | None = None):
    """The dataset in order, `batch_size` examples at a time (the first `limit` only)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield take(dataset, range(start, min(start + batch_size, n)))
