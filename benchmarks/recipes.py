"""Named training recipes on the genuine datasets, each run as a user types it, with its test
numbers and times written as the record `recipes` (or `--name`): what the documentation's results
table shows. Long recipes (the one-hour likelihood run) take `--eval-samples` for the
importance-sampled NLL of `vaelab-eval` on the whole test set.

    python benchmarks/recipes.py --data-dir ../shared/data                  # the quick recipes
    python benchmarks/recipes.py --data-dir ../shared/data --name hour --eval-samples 5000 \\
        --recipe "experiment=mnist_best trainer.max_time=00:00:58:00"
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

QUICK = [
    "experiment=mnist_mlp_reference",
    "model=conv latent_dim=2 trainer.max_epochs=5",
    "data=fashion_mnist model=mlp beta=4 trainer.max_epochs=5",
    "model=cvae latent_dim=8 trainer.max_epochs=3",
]


def run(overrides: str, data_dir: str, out: Path, eval_samples: int) -> list:
    """One recipe as a whole command; its row: command, epochs, wall time, test numbers."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "train.py", *shlex.split(overrides),
                    f"paths.data_dir={data_dir}", f"hydra.run.dir={out}"], cwd=record.ROOT,
                   check=True, capture_output=True)
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    nll = None
    if eval_samples:
        subprocess.run([sys.executable, "eval.py", f"run_dir={out}",
                        f"nll_samples={eval_samples}"], cwd=record.ROOT, check=True,
                       capture_output=True)
        name = "eval" if eval_samples == 5000 else f"eval_K{eval_samples}"
        nll = round(json.loads((out / f"{name}.json").read_text())["eval/nll"], 2)
    print(f"{overrides}: {seconds:.0f} s, test nelbo {metrics['test/nelbo']:.2f}")
    row = [f"`python train.py {overrides}`", Path(metrics.get("best_checkpoint", "")).stem,
           round(seconds), round(metrics["test/nelbo"], 2), round(metrics["test/recon"], 2),
           round(metrics["test/kl"], 2)]
    return row + ([nll] if eval_samples else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--recipe", action="append", help="train.py overrides (repeatable)")
    parser.add_argument("--name", default="recipes")
    parser.add_argument("--eval-samples", type=int, default=0,
                        help="K of vaelab-eval's importance-sampled test NLL (0: none)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, overrides in enumerate(args.recipe or QUICK):
            rows.append(run(overrides, args.data_dir, Path(tmp) / str(i), args.eval_samples))
    nll = [f"test NLL (K={args.eval_samples})"] if args.eval_samples else []
    record.write(args.name, "Recipes on the genuine datasets, one after the other",
                 ["command", "best checkpoint", "whole command (s)", "test −ELBO", "test recon",
                  "test KL", *nll], rows,
                 ["Nats per test image. MNIST is not binarized unless the recipe says so; the "
                  "negative ELBO of a conditional model is −log p(x | y)'s bound."])


if __name__ == "__main__":
    main()
