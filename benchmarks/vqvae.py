"""The VQ-VAE with its learned prior against the conv VAE vaelab configures for the same data,
with the same training time (trainer.max_time: the VQ-VAE's two stages together, the conv
VAE's one run), and the codebook's health with and without restarts of dead codes. Writes the
records `vqvae` and `vqvae_codebook` (with --skip-fashion, `vqvae_icons` instead of `vqvae`), and
with --pictures the samples pictures of docs/vqvae.md.

    python benchmarks/vqvae.py --data-dir ../shared/data --icons /tmp/icons300 --pictures

On the icons the conv VAE runs twice: with the image-folder defaults (the pixel window) and with
the mixture whose pixels are independent given z, which leaves every detail to z.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

DOCS = record.ROOT / "docs"


def run(script: str, args: list[str]) -> float:
    """Seconds of one whole command."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, script, *args], cwd=record.ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def minutes(m: float) -> str:
    return f"trainer.max_time=00:00:{int(m):02d}:{int(round(m % 1 * 60)):02d}"


def scores(run_dir: Path, samples: int, limit: int | None) -> dict:
    out = run_dir / "scored"
    run("eval.py", [f"run_dir={run_dir}", f"nll_samples={samples}", f"out_dir={out}",
                    *([f"limit={limit}"] if limit else [])])
    return json.loads(next(out.glob("eval*.json")).read_text())


def codebook_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(codes in use, perplexity) after each validation, from the run's TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    used = [e.value for e in events.Scalars("codebook/codes_in_use")]
    perplexity = [e.value for e in events.Scalars("codebook/perplexity")]
    return list(zip(used, perplexity, strict=True))


def epochs(run_dir: Path) -> int:
    """Epochs completed (each ends with a validation; a time limit may stop one midway)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return len(events.Scalars("val/loss"))


def pictures(run_dir: Path, name: str, which: list[str]) -> None:
    """samples.png (and uniform_samples.png) of a run, copied into docs/ as vqvae_<name>_*.png."""
    out = run_dir / "pictures"
    run("generate.py", [f"run_dir={out.parent}", f"pictures=[{','.join(which)}]",
                        f"out_dir={out}", "samples.n=32", "nrow=8"])
    for picture in which:
        shutil.copy(out / f"{picture}.png", DOCS / f"vqvae_{name}_{picture}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--icons", type=Path, help="an image folder with train/ val/ test/")
    parser.add_argument("--fashion-minutes", type=float, nargs=2, default=(8, 4),
                        help="stage one and stage two; the conv VAE gets their sum")
    parser.add_argument("--icon-minutes", type=float, nargs=2, default=(4, 2))
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--pictures", action="store_true")
    parser.add_argument("--skip-fashion", action="store_true",
                        help="the icons only (record vqvae_icons)")
    args = parser.parse_args()
    setups = []
    if not args.skip_fashion:
        setups.append(("Fashion-MNIST, 8-bit", "fashion", args.fashion_minutes,
                       [f"paths.data_dir={args.data_dir}"], ["experiment=vqvae_fashion"],
                       {"conv VAE": ["experiment=mnist_8bit", "data.dataset=fashion_mnist",
                                     "trainer.max_epochs=-1"]}))
    if args.icons:
        folder = ["data=image_folder", f"data.path={args.icons.resolve()}"]
        setups.append((f"icons ({args.icons.name})", "icons", args.icon_minutes, folder,
                       ["model=vqvae", "model.grid=32", "likelihood=gaussian",
                        "likelihood.scale=pixel", "likelihood.discretized=true",
                        "lr_budget=none", "data.batch_size=32", "trainer.max_epochs=-1"],
                       {"conv VAE": ["trainer.max_epochs=-1"],
                        "conv VAE, pixels independent given z": [
                            "likelihood=dlogistic", "lr_budget=none", "data.batch_size=8",
                            "trainer.max_epochs=-1"]}))
    rows, health = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for data, name, (first, second), common, vq_args, convs in setups:
            one, two = Path(tmp) / f"{name}_vq", Path(tmp) / f"{name}_prior"
            took = run("train.py", [*common, *vq_args, minutes(first), f"hydra.run.dir={one}"])
            took += run("train.py", [*common, "experiment=vqvae_prior", f"vqvae_run={one}",
                                     "trainer.max_epochs=-1", minutes(second),
                                     f"hydra.run.dir={two}"])
            limit = args.eval_limit if name == "fashion" else None
            results = [("VQ-VAE + PixelCNN prior", scores(two, args.eval_samples, limit),
                        f"`{' '.join(vq_args)} {minutes(first)}`, then `experiment=vqvae_prior "
                        f"{minutes(second)}`", took, f"{epochs(one)} + {epochs(two)}")]
            for i, (label, conv_args) in enumerate(convs.items()):
                conv = Path(tmp) / f"{name}_conv{i}"
                took = run("train.py", [*common, *conv_args, minutes(first + second),
                                        f"hydra.run.dir={conv}"])
                results.append((label, scores(conv, args.eval_samples, limit),
                                f"`{' '.join(conv_args)} {minutes(first + second)}`", took,
                                str(epochs(conv))))
                if args.pictures and i == 0:
                    pictures(conv, f"{name}_conv", ["samples"])
            for label, result, command, took, n in results:
                rows.append([data, label, command, round(took), n,
                             round(result["eval/recon_mse_ratio"], 3),
                             round(result["eval/psnr"], 2),
                             round(result["eval/bits_per_dim"], 4),
                             result["eval/nll_samples"], result["eval/examples"]])
                print(rows[-1], flush=True)
            if args.pictures:
                pictures(two, name, ["samples", "uniform_samples"])
            if name == "icons":  # the codebook with and without restarts, same budget
                still = Path(tmp) / "icons_no_restarts"
                run("train.py", [*common, *vq_args, "model.dead_code_threshold=0",
                                 minutes(first), f"hydra.run.dir={still}"])
                for label, run_dir in (("restarts (dead_code_threshold=2)", one),
                                       ("no restarts (dead_code_threshold=0)", still)):
                    curve = codebook_curve(run_dir)
                    result = scores(run_dir, 1, None)
                    picks = [curve[0], curve[len(curve) // 2], curve[-1]]
                    health.append([data, label, len(curve),
                                   *(f"{int(u)} / {p:.0f}" for u, p in picks),
                                   round(result["eval/recon_mse_ratio"], 3)])
                    print(health[-1], flush=True)
    record.write("vqvae_icons" if args.skip_fashion else "vqvae",
                 "The VQ-VAE with a learned prior against the conv VAE, same training "
                 "time", ["data", "model", "train.py", "whole commands (s)", "epochs",
                          "test recon MSE / mean image's", "PSNR (dB)", "bits/dim",
                          "draws per image", "test images"], rows,
                 ["Both stages of the VQ-VAE together get the conv VAE's trainer.max_time; the "
                  "whole commands add start-up, the codes' encoding (stage two), the test and "
                  "the pictures. Scores by vaelab-eval on the test split: the reconstruction is "
                  "the likelihood's mean at the posterior mean (the VQ-VAE's codes); bits/dim "
                  "is the importance-sampled NLL of the conv VAE, and the VQ-VAE's bound "
                  "-log p(x|z_q) - log p(z_q) (its posterior is a point mass: one draw is "
                  "exact). The conv VAE is the one vaelab picks for the data: the latent grid "
                  "with the discretized logistic mixture (experiment=mnist_8bit's for 28 px, "
                  "data=image_folder's defaults for the icons, whose pixels also read their "
                  "neighbours; the icons' second conv VAE leaves every detail to z)."],
                 packages=("vector-quantize-pytorch",))
    if health:
        record.write("vqvae_codebook", "Codebook health over training, with and without "
                     "restarts of dead codes", ["data", "codebook", "validations",
                                                "codes in use / perplexity, first",
                                                "middle", "last",
                                                "test recon MSE / mean image's"], health,
                     ["512 codes; usage over the first 1,000 validation images (all 30 for "
                      "the icons) after each epoch (callbacks.codebook_stats). Same "
                      "trainer.max_time as the VQ-VAE's stage one in the "
                      f"`{'vqvae_icons' if args.skip_fashion else 'vqvae'}` record."],
                     packages=("vector-quantize-pytorch",))


if __name__ == "__main__":
    main()
