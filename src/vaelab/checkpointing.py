"""Checkpoints that are complete or absent, saved on SIGTERM, and read without running code."""

import logging
import os
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vaelab import loadable, schema
from vaelab.errors import BadValue, MissingFile

log = logging.getLogger(__name__)
TEMPORARY_SUFFIX = ".partial"
PREVIOUS_LAST = ".last.previous.ckpt"  # the last.ckpt before the newest, until it proves good


class CheckpointError(BadValue):
    """A checkpoint that cannot be used: unreadable, unsafe, or from another model."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync, then rename over it.

    A process killed at any moment leaves the previous checkpoint intact (rename is atomic on one
    file system); Lightning's own writer may copy across file systems from the system temp dir.
    The last.ckpt being replaced stays as `.last.previous.ckpt` (a hard link, no copy): its
    weights produced a finite loss, which the newest ones have not yet shown (see
    `roll_back_last`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            if path.name == "last.ckpt" and path.is_file():
                previous = path.with_name(f".previous.{os.getpid()}{TEMPORARY_SUFFIX}")
                os.link(path, previous)
                os.replace(previous, path.with_name(PREVIOUS_LAST))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def remove_partial_files(directory: Path) -> list[Path]:
    """Temporaries left by a process killed while writing: never a usable checkpoint."""
    stale = sorted(Path(directory).glob(f".*{TEMPORARY_SUFFIX}"))
    for path in stale:
        path.unlink()
        log.warning("removed %s, left by a run killed while saving", path)
    return stale


def roll_back_last(directory: Path, bad_step: int) -> str:
    """After a non-finite loss at `bad_step`: a last.ckpt saved at that step holds the weights
    that produced it, so the one before it becomes last.ckpt again. Returns what to tell."""
    last, previous = Path(directory) / "last.ckpt", Path(directory) / PREVIOUS_LAST
    if not last.is_file():
        return "no checkpoint was saved yet"
    if read_checkpoint(last).get("global_step", -1) < bad_step:
        return f"resume from {last}"
    if not previous.is_file():
        last.unlink()
        return f"{last} held the weights that gave it and was removed; start again"
    os.replace(previous, last)
    step = read_checkpoint(last).get("global_step")
    return f"{last} held the weights that gave it and was rolled back to step {step}: resume " \
           f"from it"


def periodic_checkpoint(dirpath: str, every_n_train_steps: int | None = None,
                        every_minutes: float | None = None) -> ModelCheckpoint | None:
    """A ModelCheckpoint that only refreshes last.ckpt, every N steps (when set) or else every so
    many minutes; None (no callback) when both are off."""
    if not every_n_train_steps and not every_minutes:
        return None
    interval = None if every_n_train_steps else timedelta(minutes=every_minutes)
    return ModelCheckpoint(dirpath=dirpath, save_top_k=0, save_last=True,
                           enable_version_counter=False,
                           every_n_train_steps=every_n_train_steps or None,
                           train_time_interval=interval)


class CheckpointOnSigterm(L.Callback):
    """SIGTERM (SLURM's warning before a time limit, `kill`) saves last.ckpt, then Lightning
    exits cleanly; `resume=<run_dir>` continues from there."""

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception):
        if not isinstance(exception, SIGTERMException) or trainer.checkpoint_callback is None:
            return
        path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("SIGTERM at step %d: saved %s", trainer.global_step, path)


def read_checkpoint(path) -> dict[str, Any]:
    """A checkpoint's contents, loaded with weights_only=True, or an error that says why.

    weights_only=True unpickles tensors and plain containers only, so a file crafted to run code
    when loaded is refused instead of executed; hyperparameters naming code to run are refused too.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({err})") from err
        raise CheckpointError(
            f"{path} was refused: it holds pickled Python objects, which could run code when "
            f"loaded (vaelab loads with weights_only=True). Use a checkpoint written by vaelab, "
            f"and only from a source you trust.") from err
    except Exception as err:  # noqa: BLE001 - garbage makes the unpickler fail in many ways
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file: "
            f"{err})") from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(
            checkpoint):
        raise CheckpointError(f"{path} is a PyTorch file but not a vaelab checkpoint (it has no "
                              f"state_dict and hyper_parameters)")
    # what it would build must be declared loadable, and its values typed and in range
    loadable.check(checkpoint["hyper_parameters"], path)
    schema.validate(checkpoint["hyper_parameters"], schema.Hparams, str(path))
    return checkpoint


ARCHITECTURE_KEYS = ("model", "likelihood", "latent_dim", "data_shape")


def check_same_architecture(checkpoint: dict[str, Any], hparams: dict[str, Any], path) -> None:
    """Fail with the differing settings when a checkpoint was trained for another model."""
    saved = checkpoint["hyper_parameters"]
    differ = [f"{key}: checkpoint {saved.get(key)!r} vs this run {hparams.get(key)!r}"
              for key in ARCHITECTURE_KEYS if saved.get(key) != hparams.get(key)]
    if differ:
        raise CheckpointError(
            f"{path} belongs to another model:\n  " + "\n  ".join(differ)
            + "\nResume with the overrides the run was trained with (its .hydra/overrides.yaml).")
