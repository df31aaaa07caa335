"""Peak memory of a 128-px conv run with every picture on, at 1x and at k x the picture counts.

Pictures must not cost memory in proportion to how many images they show. This trains
`experiment=seed002_products` (conv VAE, 128x128 RGB, Gaussian likelihood) on a folder of synthetic
images for a few batches, once per scale, each in a fresh process, and prints each run's peak RSS
and the difference. Every picture's count (images, pairs, the manifold's side) is multiplied by the
scale; the validation split is made large enough to feed the largest one.

    python benchmarks/picture_memory.py                      # 1x and 4x, 10000 images in /tmp
    python benchmarks/picture_memory.py --scales 1 2 4 --folder /tmp/products
"""

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {  # the default picture counts of conf/callbacks/default.yaml
    "reconstructions.n_images": 32, "prior_samples.n_images": 64, "latent_manifold.n": 20,
    "latent_scatter.n_images": 2000, "interpolations.pairs": 8,
    "embedding_projector.n_images": 1000, "traversals.n_images": 64, "traversals.max_rows": 16,
}


def make_folder(folder: Path, n: int, size: int) -> None:
    """n coloured shapes on white, `size` px square (skipped when the folder already has them)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) >= n:
        return
    rng = random.Random(0)
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
            box = (x0, y0, x0 + rng.randint(size // 8, size // 2), y0 + rng.randint(size // 8,
                                                                                    size // 2))
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        image.save(folder / f"{i:05d}.png")


def peak_rss_mb(args: list[str]) -> float:
    """Run train.py in a fresh process (through a wrapper, so ru_maxrss is this run's alone)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, sys.executable,
                             str(ROOT / "train.py"), *args],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    warnings = [line for line in result.stderr.splitlines() if "skipped" in line]
    if warnings:
        print("  picture warnings:", *warnings, sep="\n    ")
    peak = [line for line in result.stdout.splitlines() if line.startswith("PEAK")][-1]
    return int(peak.split()[1]) / 1024  # kB on Linux


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(f for f in flags if f.startswith(("avx512_bf16", "avx512f", "avx2", "amx")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path,
                        default=Path(tempfile.gettempdir()) / "vaelab_products_128")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    make_folder(args.folder, args.images, args.size)
    print(f"{os.cpu_count()} CPUs ({cpu_flags()}), {args.images} images of {args.size} px in "
          f"{args.folder}")
    peaks = {}
    for scale in args.scales:
        overrides = [f"callbacks.{key}={count * scale}" for key, count in COUNTS.items()]
        with tempfile.TemporaryDirectory() as run:
            peaks[scale] = peak_rss_mb([
                "experiment=seed002_products", f"data.path={args.folder}",
                f"data.image_size={args.size}", "data.val_fraction=0.85",
                "data.test_fraction=0.05", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
                "+trainer.limit_test_batches=2", f"hydra.run.dir={run}", *overrides])
        print(f"  {scale}x picture counts: peak RSS {peaks[scale]:7.0f} MB")
    base = peaks[args.scales[0]]
    for scale in args.scales[1:]:
        print(f"  {scale}x - {args.scales[0]}x: {peaks[scale] - base:+.0f} MB")


if __name__ == "__main__":
    main()
