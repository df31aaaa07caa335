"""Training speed on MNIST: vaelab's Lightning loop against a plain PyTorch loop, side by side.

The plain loop is the pytorch/examples VAE setup: torchvision's MNIST with ToTensor through a
DataLoader (batch 128, shuffled), a hand-written BCE + KL loss, Adam 1e-3, float32, eager. vaelab
trains the same nets (MLP 784-400-20, or the Keras-shaped conv VAE with 2 latents) once per
setting: by default float32 (vaelab's default) and bf16-mixed with compile=true (its fast
switches). Prints seconds per 60k-image epoch, samples/s, the ratio vaelab / plain, and the test
negative ELBO each reaches after the same epochs.

    python benchmarks/throughput.py --data-dir ../shared/data                 # 10 epochs each
    python benchmarks/throughput.py --models mlp --epochs 3 --settings 32-true bf16-mixed

`--models iwae20` is the likelihood benchmark's step instead: experiment=mnist_best's net
(784-200-200-50, tanh), IWAE bound with K=5, at batch 20 (the paper's) and 100 (mnist_best's;
`--iwae-batches` picks), dynamic binarization, fused Adam, in ms per step over the same number
of steps, taking turns (median of rounds): a plain eager loop, the plain loop's loss as a bare
LightningModule (the floor that Lightning's own loop sets), and vaelab's Lightning step.
Both loops flush denormal floats to zero, as vaelab's runs do by default (`--keep-denormals`:
neither does).
`--whole-run` times whole commands instead, each a fresh process, one after the other: the
pytorch/examples MLP for `--epochs` (3) epochs as `python train.py experiment=mnist_mlp_reference`,
as pythae's own trainer with the same nets (`pip install -e ".[bench]"`), and as a plain in-memory
PyTorch loop (benchmarks/peers.py: each imports only what it needs); it writes the record
`whole_run` (benchmarks/results/):

    python benchmarks/throughput.py --data-dir ../shared/data --whole-run --epochs 3

`--accelerator gpu` runs both on the GPU (the plain loop's images, indices and noise there too),
and `--compile-modes default reduce-overhead` adds a row per torch.compile mode:

    python benchmarks/throughput.py --models iwae20 --iwae-batches 20 100 --accelerator gpu \
        --compile-modes default reduce-overhead
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from vaelab.data import MNISTDataModule
from vaelab.module import VAEModule
from vaelab.training import NoProfiler, cache_cuda_probe, compile_objective

ROOT = Path(__file__).resolve().parent.parent

MODELS = {
    "mlp": {"_target_": "vaelab.models.MLPVAE", "hidden_dims": [400]},
    "conv": {"_target_": "vaelab.models.ConvVAE"},
}
LATENTS = {"mlp": 20, "conv": 2}


def build(name: str, compiled: bool, **model) -> VAEModule:
    module = VAEModule(model=MODELS[name] | model, likelihood={
        "_target_": "vaelab.likelihoods.BernoulliLikelihood"},
        objective={"_target_": "vaelab.objectives.ELBO"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3, "fused": True},
        data_shape=[1, 28, 28], latent_dim=LATENTS[name])
    compile_objective(module, compiled, on_cpu=True)
    return module


def plain_loss(vae, x):
    """pytorch/examples' loss, summed over the batch: BCE of the decoded logits + analytic KL."""
    mu, logvar = vae.encoder(x).chunk(2, dim=-1)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    logits = vae.decoder(z).view_as(x)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def plain_loop(name, data_dir, epochs):
    """The reference: float32, eager and (conv) in PyTorch's default memory format, as
    pytorch/examples runs."""
    torch.manual_seed(0)
    plain_memory_format = {"channels_last": False} if name == "conv" else {}
    vae = build(name, compiled=False, **plain_memory_format).vae
    train = datasets.MNIST(data_dir, train=True, transform=transforms.ToTensor())
    loader = DataLoader(train, batch_size=128, shuffle=True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, _ in loader:
            optimizer.zero_grad()
            loss = plain_loss(vae, x)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    test = datasets.MNIST(data_dir, train=False, transform=transforms.ToTensor())
    with torch.no_grad():
        total = sum(plain_loss(vae, x).item() for x, _ in DataLoader(test, batch_size=1000))
    return times, len(train), total / len(test)


class EpochTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self.start)


def vaelab_loop(name, data_dir, epochs, setting):
    """`setting` is a Lightning precision, with `+compile` for compile=true."""
    precision, _, compiled = setting.partition("+")
    L.seed_everything(0, verbose=False)
    datamodule = MNISTDataModule(data_dir=data_dir, batch_size=128, eval_batch_size=1000,
                                 val_size=1)
    timer = EpochTimer()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        profiler=NoProfiler())
    module = build(name, compiled=bool(compiled))
    trainer.fit(module, datamodule=datamodule)
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0].get("test/nelbo")
    return timer.times, len(datamodule.train_set), test


IWAE_MODEL = {"_target_": "vaelab.models.MLPVAE", "hidden_dims": [200, 200],
              "activation": "tanh"}


def iwae_module(compiled: str | None, on_cpu: bool = True) -> VAEModule:
    module = VAEModule(model=IWAE_MODEL, likelihood={
        "_target_": "vaelab.likelihoods.BernoulliLikelihood"},
        objective={"_target_": "vaelab.objectives.IWAE", "mc_samples": 5},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3, "eps": 1e-4,
                   "fused": True},
        data_shape=[1, 28, 28], latent_dim=50)
    # a torch.compile mode: default, reduce-overhead, ...
    compile_objective(module, compiled, on_cpu)
    return module


def plain_iwae_loss(vae, x, k=5):
    """The negative IWAE bound by hand, averaged over the batch."""
    mu, logvar = vae.encoder(x).chunk(2, dim=-1)
    std = (0.5 * logvar).exp()
    eps = torch.randn(k, *mu.shape, device=mu.device)
    z = mu + eps * std
    logits = vae.decoder(z.flatten(0, 1)).view(k, len(x), -1)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.flatten(1).expand(k, -1, -1),
                                                 reduction="none").sum(-1)
    log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
    log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(-1)
    return -(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(k)).mean()


def clock(device: torch.device) -> float:
    """The host's clock once the device has done all it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def plain_iwae_steps(images: torch.Tensor, warmup: int, steps: int, batch: int = 20) -> float:
    """ms per step of a plain eager loop: a shuffled slice, a Bernoulli draw, the loss, Adam
    (all on the images' device)."""
    torch.manual_seed(0)
    vae = iwae_module(compiled=None).vae.to(images.device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, eps=1e-4, fused=True)
    order = torch.randperm(len(images), device=images.device)
    for i in range(warmup + steps):
        if i == warmup:
            start = clock(images.device)
        x = torch.bernoulli(images[order[i * batch % len(images):][:batch]])
        optimizer.zero_grad(set_to_none=True)
        plain_iwae_loss(vae, x).backward()
        optimizer.step()
    return (clock(images.device) - start) / steps * 1000


class StepTimer(L.Callback):
    """Wall time from the start of batch `warmup` to the end of the last one."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = clock(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == trainer.max_steps:
            self.end = clock(module.device)


# the floor module has no validation_step, and the benchmark limits validation to 0 batches
warnings.filterwarnings("ignore", message="You passed in a `val_dataloader` but have no")


class PlainStepModule(L.LightningModule):
    """The plain loop's loss and optimizer as a bare LightningModule: what Lightning's own loop
    costs, without anything vaelab adds (objective, epoch means, finite checks, logging)."""

    def __init__(self):
        super().__init__()
        self.vae = iwae_module(compiled=None).vae

    def training_step(self, batch, batch_idx):
        return plain_iwae_loss(self.vae, batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.vae.parameters(), lr=1e-3, eps=1e-4, fused=True)


def lightning_iwae_steps(module: L.LightningModule, data_dir: str, warmup: int, steps: int,
                         batch: int = 20, accelerator: str = "cpu") -> float:
    """ms per step of `module`'s training step in Lightning's loop, on vaelab's MNIST (no
    validation, checkpoints, pictures or progress bar: those are the run's, not the step's).
    A VAEModule gets the profiler that train.py gives it; the floor gets Lightning's."""
    vaelab = {"profiler": NoProfiler()} if isinstance(module, VAEModule) else {}
    L.seed_everything(0, verbose=False)
    datamodule = MNISTDataModule(data_dir=data_dir, batch_size=batch, binarize="dynamic",
                                 val_size=1000)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator=accelerator, max_steps=warmup + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        log_every_n_steps=500, **vaelab)
    trainer.fit(module, datamodule=datamodule)
    return (timer.end - timer.start) / steps * 1000


def iwae_row(data_dir: str, steps: int, batch: int, rounds: int, accelerator: str,
             compile_modes: list[str]) -> None:
    """All rows take turns, `rounds` times: this machine's speed drifts by 10-20% between
    minutes, so the median of interleaved rounds compares like with like."""
    datamodule = MNISTDataModule(data_dir=data_dir, batch_size=20, val_size=1000)
    datamodule.prepare_data()
    datamodule.setup("fit")
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    images = torch.cat([x for x, _ in datamodule.train_dataloader()]).float().to(device)
    warmup = 200

    on_cpu = accelerator == "cpu"

    def in_lightning(module: Callable[[], L.LightningModule]) -> Callable[[], float]:
        return lambda: lightning_iwae_steps(module(), data_dir, warmup, steps, batch,
                                            accelerator)

    rows = {"plain eager loop": lambda: plain_iwae_steps(images, warmup, steps, batch),
            "Lightning floor (plain loss)": in_lightning(PlainStepModule),
            "vaelab (eager)": in_lightning(lambda: iwae_module(None))} | {
        f"vaelab compile={'true' if mode == 'default' else mode}":
            in_lightning(lambda mode=mode: iwae_module(mode, on_cpu)) for mode in compile_modes}
    runs: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(rounds):
        for label, run in rows.items():
            runs[label].append(run())
    print(f"iwae (784-200-200-50, K=5, batch {batch}) on {device.type}, {steps} steps after "
          f"{warmup}, median of {rounds} interleaved rounds:")
    plain = statistics.median(runs["plain eager loop"])
    for label, times in runs.items():
        ours = statistics.median(times)
        each = " ".join(f"{t:.2f}" for t in times)
        ratio = "" if times is runs["plain eager loop"] else f"  ratio {ours / plain:.2f}" + \
            ("" if label.startswith("Lightning") else " (target <= 1.15)")
        print(f"  {label:<30} {ours:6.2f} ms/step{ratio}   rounds: {each}")


def report(label, times, n):
    steady = statistics.median(times[1:] if len(times) > 1 else times)
    per_60k = steady * 60000 / n
    print(f"  {label:<27} {per_60k:6.2f} s/epoch {n / steady:8.0f} samples/s"
          f"  (first epoch {times[0]:.2f} s, whole run {sum(times):.1f} s)", end="")
    return per_60k


def child(argv: list[str]) -> tuple[float, str]:
    """Run a whole command in a fresh process; its wall time and its output."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds, done.stdout


def vaelab_clock(run: Path) -> dict[str, list[float]]:
    """`time/epoch_s` and `time/val_s` (validation and pictures) of every epoch, from the run's
    TensorBoard events or, with `logger=csv`, its CSV log."""
    if not (run / "tensorboard").is_dir():
        import csv

        with open(run / "csv" / "metrics.csv", newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("time/epoch_s")]
        return {key: [float(row[f"time/{key}"]) for row in rows] for key in ("epoch_s", "val_s")}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {key: [e.value for e in events.Scalars(f"time/{key}")]
            for key in ("epoch_s", "val_s")}


def import_seconds(code: str) -> float:
    """Wall time of `python -c <code>`, the median of three fresh processes."""
    return statistics.median(child([sys.executable, "-c", code])[0] for _ in range(3))


def whole_run(data_dir: str, epochs: int, rounds: int) -> None:
    """vaelab's whole command (with its pictures, and with `logger=csv`, which takes none) against
    pythae's and a plain in-memory loop, taking turns for `rounds` rounds (medians: the CPU's
    speed drifts between minutes), and where vaelab's seconds go."""
    import record

    peer = [sys.executable, str(Path(__file__).resolve().parent / "peers.py")]
    command = ["train.py", "experiment=mnist_mlp_reference", f"trainer.max_epochs={epochs}"]
    variants = {"pictures": [], "csv": ["logger=csv"]}
    wall: dict[str, list[float]] = {}
    epoch: dict[str, list[float]] = {}
    train: dict[str, list[float]] = {}
    test: dict[str, float] = {}
    parts: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name in ("pythae", "plain"):
            seconds, out = child([*peer, name, "--data-dir", data_dir, "--epochs", str(epochs)])
            result = json.loads(out.strip().splitlines()[-1])
            times = result.get("epoch_s") or [result["train_s"] / epochs]
            wall.setdefault(name, []).append(seconds)
            epoch.setdefault(name, []).append(statistics.median(times[1:] or times))
            train.setdefault(name, []).append(result.get("train_s") or sum(times))
            test[name] = result["test_nelbo"]
        for name, extra in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                seconds, _ = child([sys.executable, *command, *extra, f"paths.data_dir={data_dir}",
                                    f"hydra.run.dir={tmp}/run"])
                metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
                clock = vaelab_clock(Path(tmp) / "run")
            wall.setdefault(name, []).append(seconds)
            epoch.setdefault(name, []).append(statistics.median(clock["epoch_s"][1:]
                                                                or clock["epoch_s"]))
            train.setdefault(name, []).append(metrics["time/train_s"])
            test[name] = metrics["test/nelbo"]
            if name != "pictures":
                continue
            steps = sum(e - v for e, v in zip(clock["epoch_s"], clock["val_s"], strict=True))
            fit = metrics["time/train_s"]
            for part, value in (("steps", steps), ("val", sum(clock["val_s"])),
                                ("rest", fit - sum(clock["epoch_s"])), ("outside", seconds - fit)):
                parts.setdefault(part, []).append(value)
    median = {name: statistics.median(values) for name, values in wall.items()}
    epochs_median = {name: statistics.median(values) for name, values in epoch.items()}
    labels = {
        "pictures": f"`python {' '.join(command)}`",
        "csv": f"`python {' '.join(command)} logger=csv` (no pictures)",
        "pythae": "pythae 0.1.2, its own trainer, the same nets",
        "plain": "a plain in-memory PyTorch loop",
    }
    rows = [[labels[name], round(median[name], 1), round(median[name] / median["pythae"], 2),
             round(epochs_median[name], 2),
             round(epochs_median[name] / epochs_median["plain"], 2),
             round(statistics.median(train[name]), 1), round(test[name], 2)]
            for name in ("pictures", "csv", "pythae", "plain")]
    for row in rows:
        print(" | ".join(str(v) for v in row))
    record.write("whole_run", f"The pytorch/examples MLP, {epochs} epochs on MNIST, whole commands",
                 ["command", "whole command (s)", "/ pythae", "epoch (s)", "epoch / plain loop",
                  "training (s)", "test −ELBO"], rows,
                 [f"Medians of {rounds} rounds; in each round the four commands ran one after "
                  "the other. vaelab's epoch is its median `time/epoch_s` after the first: "
                  "training, validation on 1,000 images and, with TensorBoard, the pictures of "
                  "every epoch. pythae's is its training time over the epochs (it validates on "
                  "the same 1,000 images each epoch). The plain loop's is the median after the "
                  "first, training only. Each peer imports only what it needs "
                  "(benchmarks/peers.py)."],
                 packages=("pythae",))
    torch_s, lightning_s, vaelab_s, paused_s = (import_seconds(code) for code in (
        "import torch", "import lightning", "import vaelab.training",
        "from vaelab.cli import collector_paused\nwith collector_paused(): import vaelab.training"))
    part = {name: statistics.median(values) for name, values in parts.items()}
    rows = [
        ['`python -c "import torch"`', round(torch_s, 2)],
        ['`python -c "import lightning"` (with torchmetrics and torchvision, which it imports)',
         round(lightning_s, 2)],
        ['`python -c "import vaelab.training"` (all that a run imports)', round(vaelab_s, 2)],
        ["the same with Python's collector paused while importing, and what was imported frozen "
         "(`vaelab.cli.collector_paused`, as every vaelab command imports)", round(paused_s, 2)],
        ["fit: training steps, all epochs", round(part["steps"], 2)],
        ["fit: validation and pictures, all epochs", round(part["val"], 2)],
        ["fit: the rest (sanity check, checkpoints, model summary, projector)",
         round(part["rest"], 2)],
        ["the whole command less fit (start-up, test, finish)", round(part["outside"], 2)],
    ]
    record.write("whole_run_parts", "Where the seconds of vaelab's whole command go", ["part",
                 "seconds"], rows,
                 [f"`python {' '.join(command)}`: {median['pictures']:.1f} s in all (median of "
                  f"{rounds} rounds); the parts from the run's own clock (time/*), medians of the "
                  "same rounds; the imports in fresh processes, medians of three, from the start "
                  "of the process to its end."])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["mlp", "conv"],
                        choices=[*MODELS, "iwae20"])
    parser.add_argument("--steps", type=int, default=1000, help="for iwae20, per round")
    parser.add_argument("--rounds", type=int, default=3, help="for iwae20")
    parser.add_argument("--iwae-batches", type=int, nargs="+", default=[20, 100],
                        help="for iwae20: the paper's batch and mnist_best's")
    parser.add_argument("--compile-modes", nargs="*", default=["default"],
                        help="for iwae20: torch.compile modes to time (e.g. reduce-overhead)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                        help="for iwae20")
    parser.add_argument("--settings", nargs="+", default=["32-true", "bf16-mixed+compile"],
                        help="vaelab's trainer.precision, each optionally with +compile")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--whole-run", action="store_true",
                        help="whole commands: vaelab, pythae and a plain loop (record whole_run)")
    parser.add_argument("--whole-rounds", type=int, default=3,
                        help="--whole-run: rounds of the four commands, taking turns (medians)")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="both loops keep denormal floats (train.py's flush_denormal=false)")
    args = parser.parse_args()
    if args.whole_run:
        whole_run(args.data_dir, args.epochs, args.whole_rounds)
        return
    # As train.py does (flush_denormal=true), before the first parallel op starts the threads
    # that inherit it; for both loops, so that they differ only in the loop.
    torch.set_flush_denormal(not args.keep_denormals)
    # What `python train.py` does: importing Lightning made torch probe NVML at every Adam
    # step (a plain script that never imports Lightning does not pay that either).
    cache_cuda_probe()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, denormals "
          f"{'kept' if args.keep_denormals else 'flushed'}, {args.epochs} epochs "
          f"(s/epoch: median after the first, per 60k images)")
    for name in args.models:
        if name == "iwae20":
            for batch in args.iwae_batches:
                iwae_row(args.data_dir, args.steps, batch, args.rounds, args.accelerator,
                         args.compile_modes)
            continue
        print(f"{name}:")
        times, n, test = plain_loop(name, args.data_dir, args.epochs)
        base = report("plain (float32, DataLoader)", times, n)
        print(f"  test nelbo {test:.2f}")
        for setting in args.settings:
            times, n, test = vaelab_loop(name, args.data_dir, args.epochs, setting)
            ours = report(f"vaelab {setting}", times, n)
            print(f"  test nelbo {test:.2f}  ratio {ours / base:.2f}")


if __name__ == "__main__":
    main()
