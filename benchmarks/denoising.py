"""Denoising: a plain VAE and a denoising VAE (`data.corruption`, Im et al., 2017) trained with the
same budget, each asked to reconstruct the same seeded noisy test images (`vaelab-eval` with the
noise for the plain run). Writes the record `denoising`: PSNR of the noisy and the denoised
images against the clean ones, and the test NLL.

    python benchmarks/denoising.py --data-dir ../shared/data --icons /tmp/icons300
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record


def train_and_score(train_args: list[str], noise: list[str], out: Path, samples: int,
                    denoising: bool) -> dict:
    """Train (a DVAE when `denoising`), then score the noisy test set."""
    started = time.perf_counter()
    corruption = [f"data.{k}" for k in noise] if denoising else []
    subprocess.run([sys.executable, "train.py", *train_args, *corruption,
                    f"hydra.run.dir={out}"], cwd=record.ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    tested = [] if denoising else [k.replace("corruption=", "corruption.kind=")
                                   .replace("corruption_strength=", "corruption.strength=")
                                   for k in noise]
    subprocess.run([sys.executable, "eval.py", f"run_dir={out}", f"nll_samples={samples}",
                    *tested, f"out_dir={out}/eval"], cwd=record.ROOT, check=True,
                   capture_output=True)
    result = json.loads(next((out / "eval").glob("eval*.json")).read_text())
    return {"seconds": seconds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--icons", type=Path, help="an image folder with train/ val/ test/")
    parser.add_argument("--noise", default="corruption=gaussian corruption_strength=0.25")
    parser.add_argument("--mnist", default="trainer.max_epochs=10",
                        help="train.py overrides of the MNIST runs")
    parser.add_argument("--folder", default="trainer.max_epochs=30",
                        help="train.py overrides of the image-folder runs")
    parser.add_argument("--eval-samples", type=int, default=100)
    args = parser.parse_args()
    noise = shlex.split(args.noise)
    setups = [("MNIST", [f"paths.data_dir={args.data_dir}", *shlex.split(args.mnist)])]
    if args.icons:
        setups.append((f"image folder ({args.icons.name})",
                       ["data=image_folder", f"data.path={args.icons.resolve()}",
                        *shlex.split(args.folder)]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (data, train_args) in enumerate(setups):
            for denoising in (False, True):
                r = train_and_score(train_args, noise, Path(tmp) / f"{i}{denoising}",
                                    args.eval_samples, denoising)
                name = "DVAE" if denoising else "VAE"
                print(f"{data} {name}: PSNR {r['eval/psnr_input']:.2f} -> {r['eval/psnr']:.2f} dB")
                shown = [a for a in train_args if not a.startswith(("paths.", "data.path="))]
                rows.append([data, name, f"`{' '.join(shown)}`",
                             round(r["seconds"]), round(r["eval/psnr_input"], 2),
                             round(r["eval/psnr"], 2), round(r["eval/nll"], 1)])
    record.write("denoising", "Denoising the same noisy test images: a VAE against a DVAE",
                 ["data", "model", "train.py", "whole command (s)", "PSNR noisy (dB)",
                  "PSNR denoised (dB)", f"test NLL (K={args.eval_samples})"], rows,
                 [f"Noise: `data.{' data.'.join(noise)}`, one seeded draw per test image, the "
                  f"same for both models (the VAE's through `vaelab-eval corruption.*`). PSNR "
                  f"per image, averaged; the denoised image is the likelihood's mean at the "
                  f"noisy image's posterior mean. The NLL is of the clean image, with the noisy "
                  f"image's posterior as the proposal."])


if __name__ == "__main__":
    main()
