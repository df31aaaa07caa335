"""Thin Hydra entry points, and the resolvers their configs use."""

import contextlib
import functools
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from vaelab.errors import MissingFile, user_error

# Lightning calls a torch API that torch has deprecated, on every run: nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Lightning's hint for short epochs (a folder of a few hundred images): vaelab's training
# metrics are epoch means, logged whatever log_every_n_steps is.
warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than "
                        r"the logging interval")
# Worker processes would only copy slices of splits already in memory (on a GPU, on the device).
warnings.filterwarnings("ignore", message=r".*does not have many workers")
# TF32 hints from Lightning and inductor: `matmul_precision` (conf/train.yaml) is that choice.
warnings.filterwarnings("ignore", message=r"TensorFloat32 tensor cores for float32")
logging.getLogger("lightning.fabric.utilities.rank_zero").addFilter(
    lambda record: "that has Tensor Cores" not in record.getMessage())
# inductor's C++ build imports cpp_extension, which warns when a CUDA build of PyTorch finds no
# GPU: compiling the objective for the CPU (compile=auto, mnist_best) needs no CUDA.
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: "No CUDA runtime is found" not in record.getMessage())


def config_dir() -> str:
    """conf/ as shipped inside the wheel, else the repository's conf/ (editable install)."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "conf")


def reports_user_errors(task: Callable) -> Callable:
    """A Hydra task whose bad-input errors end the command with their message alone on stderr
    and exit status 1; bugs keep their traceback, and HYDRA_FULL_ERROR=1 shows it for both."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as err:
            found = user_error(err)
            if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"Error: {found}", file=sys.stderr)
            raise SystemExit(1) from None

    return run


@contextlib.contextmanager
def collector_paused():
    """Import torch and Lightning with the cyclic garbage collector paused, then freeze what they
    loaded: collections triggered by their many long-lived objects slow the import down, and every
    later full collection, the one at exit included, would walk them again (the record
    `whole_run_parts` has both timings). Once per process, after a collection: no garbage is
    frozen, a sweep's next job's included."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def write_atomically(path: Path, content: str | bytes) -> None:
    """A whole file or none: a process killed while writing leaves the previous one intact."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    if isinstance(content, bytes):
        temporary.write_bytes(content)
    else:
        temporary.write_text(content)
    os.replace(temporary, path)


def resume_checkpoint(resume: str | None, ckpt_path: str | None) -> str | None:
    """`resume=<run dir>` is short for `ckpt_path=<run dir>/checkpoints/last.ckpt`."""
    return ckpt_path or (str(Path(resume) / "checkpoints" / "last.ckpt") if resume else None)


_CLAIMED: dict[str, str] = {}  # per process: Hydra may resolve the run dir more than once


def claim(new: str) -> str:
    """Make a new run's folder now, so that a run started in the same second gets its own
    (`<time>_2`, `<time>_3`, ...): mkdir either creates a folder or fails, never shares one."""
    if new not in _CLAIMED:
        candidate, n = new, 1
        while True:
            try:
                Path(candidate).mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                candidate = f"{new}_{n}"
        _CLAIMED[new] = candidate
    return _CLAIMED[new]


def run_dir(resume: str | None, ckpt_path: str | None, new: str) -> str:
    """A resumed run continues in the folder its checkpoint came from; others get a folder of
    their own under `new`. A checkpoint that does not exist is an error before anything is
    written."""
    ckpt = resume_checkpoint(resume, ckpt_path)
    if ckpt and not Path(ckpt).expanduser().is_file():
        key = "resume" if resume and not ckpt_path else "ckpt_path"
        raise MissingFile(f"{key}: checkpoint {ckpt} does not exist")
    if ckpt and Path(ckpt).parent.name == "checkpoints":
        return str(Path(ckpt).parent.parent)
    return claim(new)


def config_subdir(resume: str | None, ckpt_path: str | None, now: str) -> str:
    """A resume records its own config beside, never over, the run's original .hydra/."""
    return f".hydra/resumed-{now}" if resume_checkpoint(resume, ckpt_path) else ".hydra"


# The command line and DDP variables as launched: jobs of a multirun rewrite them for their ranks.
LAUNCH_ARGV = tuple(sys.argv)
DDP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
LAUNCH_DDP_ENV = {key: os.environ.get(key) for key in DDP_VARIABLES}


def is_sweep(value: str) -> bool:
    """`a,b` (a comma outside brackets and quotes) or one of Hydra's sweep functions."""
    if value.startswith(("range(", "choice(", "interval(", "glob(")):
        return True
    depth, quote = 0, None
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            return True
    return False


def short(override: str) -> str:
    """`lr=0.00190303683817358` -> `lr=0.001903`: floats to 4 significant digits."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if "." in value or "e" in value.lower() else override


def sweep_subdir(num: int, task_overrides, sweeper_params) -> str:
    """A job's folder: its number and the values of the swept keys only, e.g.
    `3_beta=4,latent_dim=8` (the command line's fixed overrides are the same for every job)."""
    swept = set(sweeper_params or {})
    for arg in LAUNCH_ARGV[1:]:
        key, _, value = arg.partition("=")
        if value and is_sweep(value):
            swept.add(key.lstrip("+~"))
    parts = [short(o) for o in task_overrides if o.partition("=")[0].lstrip("+~") in swept]
    return f"{num}_" + ",".join(parts).replace("/", "_") if parts else str(num)


OmegaConf.register_new_resolver("vaelab.sweep_subdir", sweep_subdir, replace=True)
OmegaConf.register_new_resolver("vaelab.resume_checkpoint", resume_checkpoint, replace=True)
OmegaConf.register_new_resolver("vaelab.run_dir", run_dir, replace=True)
# cached: the jobs of a sweep (also in joblib's worker processes) read the folder it claimed
OmegaConf.register_new_resolver("vaelab.claim", claim, replace=True, use_cache=True)
OmegaConf.register_new_resolver("vaelab.config_subdir", config_subdir, replace=True)
