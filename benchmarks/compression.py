"""Lossless compression: vaelab-compress (bits-back coding with a trained run) against PNG
(`optimize=True`), lossless WebP, gzip, bz2 and LZMA on the very same 8-bit images, in one run.
Writes the record `compression` (or `--name`).

    python benchmarks/compression.py --case "binarized MNIST test" <run> mnist:test \\
        --case "8-bit MNIST test" <run> mnist:test --case "icons, test" <run> <folder>

Each case is a trained run and an input; the images coded are the ones vaelab-compress reads
(a run on dynamically binarized MNIST codes the seeded static binarization of its test set).
PNG and WebP code each image as a file of its own (binary images as 1-bit PNGs); gzip, bz2 and
LZMA code the whole set as one stream of bytes, one byte per value. The model's -ELBO is its
run's test/nelbo, in bits per value.
"""

import argparse
import bz2
import gzip
import io
import json
import lzma
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import record
from PIL import Image

CODECS = ("PNG", "WebP (lossless)", "gzip -9", "bz2 -9", "LZMA")


def codec_bits(images: np.ndarray, binary: bool) -> dict[str, float]:
    """Bits per value of each classic codec on images [N, C, H, W] uint8."""
    sizes = dict.fromkeys(CODECS, 0)
    for chw in images:
        hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
        picture = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        for name, options, image in (
                ("PNG", {"format": "PNG", "optimize": True},
                 picture.convert("1") if binary else picture),
                ("WebP (lossless)", {"format": "WEBP", "lossless": True, "quality": 100,
                                     "method": 6}, picture)):
            buffer = io.BytesIO()
            image.save(buffer, **options)
            sizes[name] += len(buffer.getvalue())
    raw = (images // 255 if binary else images).tobytes()
    sizes["gzip -9"] = len(gzip.compress(raw, 9, mtime=0))
    sizes["bz2 -9"] = len(bz2.compress(raw, 9))
    sizes["LZMA"] = len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    return {name: 8 * size / images.size for name, size in sizes.items()}


def coded_images(run: str, source: str) -> np.ndarray:
    """The images vaelab-compress codes for this run and input."""
    from vaelab import runs
    from vaelab.compression import images

    module, _ = runs.load_module(runs.resolve(run, None)[1])
    return images.read(source, runs.run_config(Path(run)), module.vae.data_shape).images.numpy()


def case(label: str, run: str, source: str, out: Path, precision: int) -> list:
    file = out / f"{re.sub(r'[^A-Za-z0-9-]+', '_', label)}.vbb"  # a Hydra value: no commas
    subprocess.run([sys.executable, "-m", "vaelab.cli.compress", f"run_dir={run}",
                    f"input={source}", f"out={file}", f"precision={precision}"],
                   cwd=record.ROOT, check=True)
    stats = json.loads(file.with_name(file.name + ".json").read_text())
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    nelbo = metrics["test/nelbo"] / (stats["values_per_image"] * math.log(2))
    images = coded_images(run, source)
    codecs = codec_bits(images, binary=bool(np.isin(images, (0, 255)).all()))
    print(f"{label}: file {stats['bits_per_dim']:.4f} bits/dim, -ELBO {nelbo:.4f}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in codecs.items()))
    return [label, stats["images"], len(stats["lead_webp_bits"]),
            round(stats["bits_per_dim"], 4), round(nelbo, 4),
            round(stats["bits_per_dim"] / nelbo, 4),
            *(round(codecs[name], 3) for name in CODECS),
            round(stats["encode_images_per_s"]), round(stats["decode_images_per_s"]),
            "yes" if stats.get("verified") else "no"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, action="append", required=True,
                        metavar=("LABEL", "RUN_DIR", "INPUT"))
    parser.add_argument("--precision", type=int, default=8)
    parser.add_argument("--name", default="compression")
    parser.add_argument("--note", action="append", default=[],
                        help="how a case's run was trained (repeatable)")
    args = parser.parse_args()
    threads = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [case(label, run, source, Path(tmp), args.precision)
                for label, run, source in args.case]
    record.write(args.name, "Lossless compression, bits per value (8-bit images; binary ones: "
                 "per pixel)", ["data", "images", "of them WebP", "vaelab file", "model -ELBO",
                                 "file / -ELBO",
                                *CODECS, "coding (images/s)", "decoding (images/s)",
                                "decoded byte for byte"], rows,
                 [f"vaelab-compress precision={args.precision}, default chunk (100 images), on "
                  f"{threads} CPU threads; the file's bits include its header, its checksum and "
                  f"the start of the chain: the seeded words the first image's latents take, or, "
                  f"where that is smaller (lead=auto), the first images as lossless WebP files "
                  f"(the column 'of them WebP'), whose bytes the next images' latents take. "
                  f"PNG and WebP: one file per image; "
                  f"gzip, bz2, LZMA: the whole set as one stream, a byte per value.",
                  *args.note], packages=("constriction",))


if __name__ == "__main__":
    main()
