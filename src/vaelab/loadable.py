"""What may be built from a file: the `_target_`s vaelab declares loadable.

Checkpoints and run dirs are untrusted. `torch.load(weights_only=True)` keeps pickled code out,
but their hyperparameters and `.hydra/config.yaml` are Hydra specs, and `instantiate` would call
whatever `_target_` they name (`builtins.open`, `os.system`, ...). Every spec read from disk is
checked here first, down to nested dicts and `_args_` lists; a config typed on the command line is
the user's own and is not restricted.

Interpolations are code too: `instantiate` resolves them, and `${oc.create:{_target_: ...}}` or
`${oc.decode:...}` would build a spec that no check saw, while a resolver such as vaelab's run-dir
claim writes to disk. So a spec handed to `instantiate` must be resolved (no `${` left), and a run
dir's config may use only the resolvers that read (`oc.env`, `oc.select`, `hydra`, `now`).
"""

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from vaelab.errors import BadValue

LOADABLE: set[str] = {
    "vaelab.models.MLPVAE", "vaelab.models.ConvVAE", "vaelab.models.HierarchicalVAE",
    "vaelab.models.LadderVAE", "vaelab.models.ConvLadderVAE", "vaelab.models.VQVAE",
    "vaelab.models.StandardNormal", "vaelab.models.VampPrior", "vaelab.models.PixelCNNPrior",
    "vaelab.likelihoods.BernoulliLikelihood", "vaelab.likelihoods.GaussianLikelihood",
    "vaelab.likelihoods.LogisticMixtureLikelihood",
    "vaelab.objectives.ELBO", "vaelab.objectives.IWAE", "vaelab.objectives.BetaTCVAE",
    "vaelab.objectives.AnnealedCapacity", "vaelab.objectives.DIPVAE",
    "vaelab.objectives.FactorVAE",
    "vaelab.data.MNISTDataModule", "vaelab.data.ImageFolderDataModule",
    "vaelab.data.DSpritesDataModule",
    "vaelab.schedules.iwae_paper",
}
READING_RESOLVERS = {"oc.env", "oc.select", "hydra", "now"}
RESOLVER = re.compile(r"\$\{\s*([^:}\s]+)\s*:")  # `${name:` opens a resolver's call
# torch's own optimizers and LR schedulers, by class (checked on the module, never imported)
TORCH_FAMILIES = {"torch.optim": torch.optim.Optimizer,
                  "torch.optim.lr_scheduler": (torch.optim.lr_scheduler.LRScheduler,
                                               torch.optim.lr_scheduler.ReduceLROnPlateau)}


class UnsafeSpecError(BadValue):
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


def walk(spec: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every (where, key, value) in a nested spec of dicts and lists (keys of lists: None)."""
    if isinstance(spec, Mapping):  # dicts and OmegaConf DictConfigs
        items = spec.items()
    elif isinstance(spec, list | tuple):
        items = enumerate(spec)
    else:
        return
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        yield where, key, value
        if key != "_target_":
            yield from walk(value, where)


def strings(spec: Any) -> Iterator[tuple[str, str]]:
    return ((where, value) for where, _, value in walk(spec) if isinstance(value, str))


def check_resolvers(config: Any, source) -> None:
    """Refuse an unresolved config from `source` that calls a resolver which builds or writes."""
    bad = [(where, name) for where, text in strings(config) for name in RESOLVER.findall(text)
           if name not in READING_RESOLVERS]
    if bad:
        listed = ", ".join(f"{where} calls ${{{name}:...}}" for where, name in bad)
        raise UnsafeSpecError(f"{source} was refused: {listed}; a run dir's config may only use "
                              f"the resolvers {sorted(READING_RESOLVERS)}")


def check(spec: Any, source) -> None:
    """Refuse a resolved spec read from `source` that names any target vaelab does not declare,
    or still holds an interpolation that `instantiate` would resolve."""
    unresolved = [where for where, text in strings(spec) if "${" in text]
    if unresolved:
        raise UnsafeSpecError(f"{source} was refused: interpolations (${{...}}) in "
                              f"{', '.join(unresolved)} could build code that no check saw; "
                              f"vaelab writes resolved values only")
    bad = [(where, target) for where, key, target in walk(spec)
           if key == "_target_" and not is_loadable(target)]
    if bad:
        listed = ", ".join(f"{where}={target!r}" for where, target in bad)
        raise UnsafeSpecError(
            f"{source} names code that vaelab does not load from files ({listed}); only vaelab's "
            f"models, likelihoods, objectives, DataModules and torch's optimizers and schedulers "
            f"may be built from a checkpoint or a run dir. If the file is yours and the target "
            f"is a family of your own, call vaelab.loadable.declare_loadable({bad[0][1]!r}) "
            f"first.")
