"""Image-folder likelihoods against lossless codecs: each recipe trained on an icon folder as a user
types it (`data=image_folder`, 30 epochs), then `vaelab-eval` on one split (importance-sampled
bits/dim and the reconstruction's squared error over the mean image's), beside PNG
(`optimize=True`), lossless WebP, gzip, bz2 and LZMA on the very same 8-bit images (vaelab's own
decoding: resized, centre-cropped, composited onto white). Writes the record `image_density`
(or `--name`).

    python benchmarks/image_density.py --assemble <dir of icon PNGs> --icons /tmp/icons300 \\
        --split val --recipe "likelihood=dlogistic" --recipe "likelihood=gaussian"

`--assemble` copies a seeded choice of `--count` icons into train/ val/ test/ (80/10/10), e.g.
from the npm package emoji-datasource-google (img/google/64). Defaults are chosen on `val`;
`test` is for reporting.
"""

import argparse
import bz2
import gzip
import io
import json
import lzma
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import record
from PIL import Image

DEFAULT = "(the defaults)"


def assemble(source: Path, dest: Path, count: int, seed: int) -> None:
    """A seeded choice of `count` images from `source`, 80/10/10 into dest/{train,val,test}."""
    files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".png")
    random.Random(seed).shuffle(files)
    files = files[:count]
    n_train = count - 2 * (count // 10)
    splits = {"train": files[:n_train], "val": files[n_train:n_train + count // 10],
              "test": files[n_train + count // 10:]}
    for split, part in splits.items():
        (dest / split).mkdir(parents=True, exist_ok=True)
        for path in part:
            shutil.copy(path, dest / split / path.name)


def codec_bits(images: list[np.ndarray]) -> dict[str, float]:
    """Bits per 8-bit value of each lossless codec, over all images (each coded on its own)."""
    sizes = dict.fromkeys(("PNG", "WebP (lossless)", "gzip -9", "bz2 -9", "LZMA"), 0)
    for chw in images:
        hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
        picture = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        for name, options in (("PNG", {"format": "PNG", "optimize": True}),
                              ("WebP (lossless)", {"format": "WEBP", "lossless": True,
                                                   "quality": 100, "method": 6})):
            buffer = io.BytesIO()
            picture.save(buffer, **options)
            sizes[name] += len(buffer.getvalue())
        raw = hwc.tobytes()
        sizes["gzip -9"] += len(gzip.compress(raw, 9, mtime=0))
        sizes["bz2 -9"] += len(bz2.compress(raw, 9))
        sizes["LZMA"] += len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    values = sum(a.size for a in images)
    return {name: 8 * size / values for name, size in sizes.items()}


def split_images(icons: Path, split: str, size: int) -> list[np.ndarray]:
    """The split's images exactly as vaelab trains on them (RGB, white background)."""
    from vaelab.data.image_folder import decode, find_images

    return [decode(p, size, 3, (255, 255, 255)) for p in find_images(icons / split)]


def run(overrides: str, icons: Path, split: str, epochs: int, samples: int, out: Path) -> list:
    """One recipe: train, evaluate on `split`; its row."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "data=image_folder", f"data.path={icons}",
                    f"trainer.max_epochs={epochs}", *shlex.split(overrides),
                    f"hydra.run.dir={out}"], cwd=record.ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    subprocess.run([sys.executable, "eval.py", f"run_dir={out}", f"split={split}",
                    f"nll_samples={samples}", f"out_dir={out}/eval"], cwd=record.ROOT,
                   check=True, capture_output=True)
    result = json.loads(next((out / "eval").glob("eval*.json")).read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"{overrides or DEFAULT}: {seconds:.0f} s, {split} bits/dim "
          f"{result['eval/bits_per_dim']:.3f}, MSE ratio {result['eval/recon_mse_ratio']:.3f}")
    return [f"`{overrides}`" if overrides else DEFAULT, round(seconds),
            round(metrics["time/epoch_s"], 1), round(result["eval/bits_per_dim"], 3),
            round(result["eval/recon_mse_ratio"], 3), round(result["eval/kl"], 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--icons", type=Path, required=True, help="folder with train/ val/ test/")
    parser.add_argument("--assemble", type=Path, help="first fill --icons from this folder")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-samples", type=int, default=100,
                        help="K of vaelab-eval's importance-sampled bits/dim")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--recipe", action="append", help="train.py overrides (repeatable)")
    parser.add_argument("--source", default="", help="where the icons come from (for the note)")
    parser.add_argument("--name", default="image_density")
    parser.add_argument("--runs", type=Path, help="keep the recipes' run dirs here (default: "
                        "a temporary folder)")
    args = parser.parse_args()
    if args.assemble:
        assemble(args.assemble, args.icons, args.count, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = (args.runs or Path(tmp)).resolve()
        for i, overrides in enumerate(args.recipe or [""]):
            rows.append(run(overrides, args.icons.resolve(), args.split, args.epochs,
                            args.eval_samples, runs / str(i)))
    images = split_images(args.icons, args.split, args.size)
    for name, bits in codec_bits(images).items():
        rows.append([name, None, None, round(bits, 3), None, None])
    record.write(args.name, f"Bits per dimension on {len(images)} {args.split} icons, "
                 f"{args.size} px RGB", ["recipe (`data=image_folder`) or codec",
                                         "whole command (s)", "epoch (s)", "bits/dim",
                                         "recon MSE / mean image's", "KL (nats)"], rows,
                 [f"{args.count} icons ({args.source or args.icons.name}), split 80/10/10 with "
                  f"seed {args.seed}, composited onto white; {args.epochs} epochs; bits/dim from "
                  f"`vaelab-eval split={args.split} nll_samples={args.eval_samples}`. Codecs "
                  f"code each image on its own."])


if __name__ == "__main__":
    main()
