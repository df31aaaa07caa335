"""What may be built from a file: the `_target_`s vaelab declares loadable.

Checkpoints and run dirs are untrusted. `torch.load(weights_only=True)` keeps pickled code out,
but their hyperparameters and `.hydra/config.yaml` are Hydra specs, and `instantiate` would call
whatever `_target_` they name (`builtins.open`, `os.system`, ...). Every spec read from disk is
checked here first, down to nested dicts and `_args_` lists; a config typed on the command line is
the user's own and is not restricted.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import torch

LOADABLE: set[str] = {
    "vaelab.models.MLPVAE", "vaelab.models.ConvVAE", "vaelab.models.HierarchicalVAE",
    "vaelab.models.StandardNormal", "vaelab.models.VampPrior",
    "vaelab.likelihoods.BernoulliLikelihood", "vaelab.likelihoods.GaussianLikelihood",
    "vaelab.objectives.ELBO", "vaelab.objectives.IWAE",
    "vaelab.data.MNISTDataModule", "vaelab.data.ImageFolderDataModule",
    "vaelab.schedules.iwae_paper",
}
# torch's own optimizers and LR schedulers, by class (checked on the module, never imported)
TORCH_FAMILIES = {"torch.optim": torch.optim.Optimizer,
                  "torch.optim.lr_scheduler": (torch.optim.lr_scheduler.LRScheduler,
                                               torch.optim.lr_scheduler.ReduceLROnPlateau)}


class UnsafeSpecError(ValueError):
    """A file asked to build something vaelab does not declare loadable."""


def declare_loadable(*targets: str) -> None:
    """Let checkpoints and run dirs name these targets too (a family of your own)."""
    LOADABLE.update(targets)


def is_loadable(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in LOADABLE:
        return True
    module_name, _, name = target.rpartition(".")
    family = TORCH_FAMILIES.get(module_name)
    if family is None or name.startswith("_"):
        return False
    module = torch.optim if module_name == "torch.optim" else torch.optim.lr_scheduler
    candidate = getattr(module, name, None)
    return isinstance(candidate, type) and issubclass(candidate, family)


def targets(spec: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (where, _target_) in a nested spec of dicts and lists."""
    if isinstance(spec, Mapping):  # dicts and OmegaConf DictConfigs
        for key, value in spec.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, value
            else:
                yield from targets(value, where)
    elif isinstance(spec, list | tuple):
        for i, value in enumerate(spec):
            yield from targets(value, f"{path}[{i}]")


def check(spec: Any, source) -> None:
    """Refuse a spec read from `source` that names any target vaelab does not declare."""
    bad = [(where, target) for where, target in targets(spec) if not is_loadable(target)]
    if bad:
        listed = ", ".join(f"{where}={target!r}" for where, target in bad)
        raise UnsafeSpecError(
            f"{source} names code that vaelab does not load from files ({listed}); only vaelab's "
            f"models, likelihoods, objectives, DataModules and torch's optimizers and schedulers "
            f"may be built from a checkpoint or a run dir. If the file is yours and the target "
            f"is a family of your own, call vaelab.loadable.declare_loadable({bad[0][1]!r}) "
            f"first.")
