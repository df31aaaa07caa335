"""Thin Hydra entry points."""

from pathlib import Path


def config_dir() -> str:
    """conf/ as shipped inside the wheel, else the repository's conf/ (editable install)."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "conf")
