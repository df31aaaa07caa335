"""Thin Hydra entry points, and the resolvers their configs use."""

from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> str:
    """conf/ as shipped inside the wheel, else the repository's conf/ (editable install)."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "conf")


def resume_checkpoint(resume: str | None, ckpt_path: str | None) -> str | None:
    """`resume=<run dir>` is short for `ckpt_path=<run dir>/checkpoints/last.ckpt`."""
    return ckpt_path or (str(Path(resume) / "checkpoints" / "last.ckpt") if resume else None)


def run_dir(resume: str | None, ckpt_path: str | None, new: str) -> str:
    """A resumed run continues in the folder its checkpoint came from; others get `new`."""
    ckpt = resume_checkpoint(resume, ckpt_path)
    if ckpt and Path(ckpt).parent.name == "checkpoints":
        return str(Path(ckpt).parent.parent)
    return new


def config_subdir(resume: str | None, ckpt_path: str | None, now: str) -> str:
    """A resume records its own config beside, never over, the run's original .hydra/."""
    return f".hydra/resumed-{now}" if resume_checkpoint(resume, ckpt_path) else ".hydra"


OmegaConf.register_new_resolver("vaelab.resume_checkpoint", resume_checkpoint, replace=True)
OmegaConf.register_new_resolver("vaelab.run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("vaelab.config_subdir", config_subdir, replace=True)
