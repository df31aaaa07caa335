"""A benchmark's figures as a JSON record under benchmarks/results/, with what they depend on:
the date, the command, the git commit, the versions, and the CPU (model and the flags that change
speed) or GPU. The documentation's tables are rendered from these records (docs/hooks/results.py),
never typed, so every figure there names where and how it was measured."""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# the CPU flags that decided speed in vaelab's measurements (bf16 autocast, compile, matmuls)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "neon", "sve")


def cpu() -> dict[str, Any]:
    """The CPU's model name, its speed-relevant flags and the cores this process may use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "flags": [f for f in SPEED_FLAGS if f in flags], "cores": cores}


def gpu() -> str | None:
    """The GPU's name when torch is loaded and sees one (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def versions(*extra: str) -> dict[str, str]:
    packages = ("vaelab", "torch", "lightning", "hydra-core", *extra)
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def commit() -> str:
    """HEAD's hash, with `-dirty` when the work tree differs from it (records aside: a script
    that writes two records is not dirty for the second)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    head = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                       ":!benchmarks/results").strip()
                   else "")


def write(name: str, title: str, columns: list[str], rows: list[list[Any]],
          notes: list[str] = (), packages: tuple[str, ...] = ()) -> Path:
    """Write benchmarks/results/<name>.json (replacing the previous record of that name)."""
    record = {
        "name": name, "title": title,
        "date": datetime.date.today().isoformat(),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "commit": commit(), "versions": versions(*packages),
        "hardware": {"cpu": cpu(), "gpu": gpu()},
        "columns": columns, "rows": rows, "notes": list(notes),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"record written to {os.path.relpath(path)}")
    return path
