"""Runs that survive: resume, kills, SIGTERM, reproducibility, bad input, NaNs, unsafe files."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, TINY
from vaelab.checkpointing import CheckpointError, read_checkpoint
from vaelab.training import train

CPU = "trainer.accelerator=cpu"
NO_PICTURES = [f"callbacks.{k}=null" for k in ("reconstructions", "prior_samples",
                                                "latent_manifold", "latent_scatter",
                                                "interpolations", "embedding_projector",
                                                "traversals")]


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("objective", [
    [],
    # two optimizers (manual optimization), the discriminator's weights and its Adam state
    ["objective=factor_vae", "objective.hidden=32", "objective.layers=2"],
])
def test_resume_from_an_epoch_end_matches_the_uninterrupted_run(compose_train, tmp_path,
                                                                objective):
    common = [CPU, "data.binarize=dynamic", "model=conv", "latent_dim=3", "mc_samples=2",
              *NO_PICTURES, *objective]
    full = train(compose_train(*common, "trainer.max_epochs=3", output_dir=tmp_path / "full"))
    part = tmp_path / "part"
    train(compose_train(*common, "trainer.max_epochs=2", output_dir=part))
    resumed = train(compose_train(*common, "trainer.max_epochs=3", f"resume={part}",
                                  output_dir=part))
    keys = ["test/nelbo", "test/kl", "val/loss", "train/loss"]
    if objective:
        keys += ["val/tc", "train/adversary_loss"]
        checkpoint = read_checkpoint(part / "checkpoints" / "last.ckpt")
        assert len(checkpoint["optimizer_states"]) == 2
        assert any(k.startswith("objective.discriminator.") for k in checkpoint["state_dict"])
    for key in keys:
        assert resumed[key] == pytest.approx(full[key], rel=1e-6, abs=1e-6), key
    curve = [(e.step, e.value) for e in events(part).Scalars("val/loss")]
    reference = [(e.step, e.value) for e in events(tmp_path / "full").Scalars("val/loss")]
    assert len(curve) == 3 and [s for s, _ in curve] == [s for s, _ in reference]


def run_train(args, cwd=ROOT, **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "train.py", *TINY, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(predicate, process, timeout=120.0, poll=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def test_a_killed_factor_vae_resumes_to_the_uninterrupted_numbers(compose_train, data_dir,
                                                                   tmp_path):
    """SIGKILL a FactorVAE run (two optimizers) once an epoch-end last.ckpt exists, resume it:
    the test numbers equal those of a run that was never killed (trained in-process)."""
    settings = [CPU, "objective=factor_vae", "objective.hidden=32", "objective.layers=2",
                "trainer.max_epochs=6", *NO_PICTURES]
    common = [f"paths.data_dir={data_dir}", *settings]
    train(compose_train(*settings, output_dir=tmp_path / "whole"))
    run = tmp_path / "killed"
    process = run_train([*common, f"hydra.run.dir={run}"])
    last = run / "checkpoints" / "last.ckpt"

    def two_epochs_saved():
        try:
            return last.is_file() and read_checkpoint(last)["epoch"] >= 2
        except Exception:  # noqa: BLE001 - replaced while being read
            return False

    try:
        assert wait_for(two_epochs_saved, process), process.stdout.read()[-3000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    killed_at = read_checkpoint(last)["global_step"]
    resumed = run_train([*common, f"hydra.run.dir={run}", f"resume={run}"])
    assert resumed.wait(600) == 0, resumed.stdout.read()[-3000:]
    before, after = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole",
                                                                           run))
    assert killed_at < 6 * 2 * 5  # killed before the end (5 batches, 2 optimizer steps each)
    for key in ("test/nelbo", "test/tc", "val/loss", "train/adversary_loss"):
        assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-6), key


def test_sigkill_while_saving_never_leaves_a_truncated_checkpoint(data_dir, tmp_path):
    """A big model saved every step: kill the process while a checkpoint is being written."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = [f"paths.data_dir={data_dir}", CPU, f"hydra.run.dir={run}",
            "model.hidden_dims=[1536,1536]", "callbacks.periodic_checkpoint.every_n_train_steps=1",
            "trainer.log_every_n_steps=1", *NO_PICTURES]
    process = run_train([*args, "trainer.max_epochs=50"])
    try:
        # Let one last.ckpt complete, then catch the next one mid-write.
        assert wait_for(lambda: (ckpts / "last.ckpt").is_file(), process), process.stdout.read()
        assert wait_for(lambda: list(ckpts.glob(".*.partial")), process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    assert list(ckpts.glob(".*.partial")), "the kill should have hit a write in progress"
    checkpoint = read_checkpoint(ckpts / "last.ckpt")  # complete and loadable
    assert checkpoint["global_step"] >= 1

    # Resume in the same run dir: the stale temporary goes, training finishes, one curve.
    resumed = run_train([*args, "trainer.max_epochs=2", f"resume={run}"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert not list(ckpts.glob(".*.partial"))
    assert not list(ckpts.glob("last-v*.ckpt"))  # the resume overwrote its own last.ckpt
    assert (run / ".hydra" / "config.yaml").is_file() and list((run / ".hydra").glob("resumed-*"))
    val = [e.step for e in events(run).Scalars("val/loss")]
    assert len(val) == len(set(val)) == 2  # one point per epoch, no duplicate
    steps = [e.step for e in events(run).Scalars("train_step/loss")]
    assert len(steps) == len(set(steps))
    assert json.loads((run / "metrics.json").read_text())["test/nelbo"] > 0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    process = run_train([f"paths.data_dir={data_dir}", CPU, f"hydra.run.dir={tmp_path}",
                         "trainer.max_epochs=100000", *NO_PICTURES])
    try:
        assert wait_for(ckpt.is_file, process, poll=0.05), process.stdout.read()
        first = read_checkpoint(ckpt)["global_step"]
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM" in output
    assert read_checkpoint(ckpt)["global_step"] > first


def test_same_seed_same_numbers_other_seed_other_numbers(compose_train, tmp_path):
    def metrics(seed, name):
        cfg = compose_train(CPU, "trainer.max_epochs=1", f"seed={seed}", *NO_PICTURES,
                            output_dir=tmp_path / name)
        return train(cfg)

    a, b, c = metrics(1, "a"), metrics(1, "b"), metrics(2, "c")
    assert a["test/nelbo"] == b["test/nelbo"] and a["val/kl"] == b["val/kl"]
    assert a["test/nelbo"] != c["test/nelbo"]


@pytest.mark.parametrize("override, words", [
    ("latent_dim=0", ["latent_dim", ">= 1"]),
    ("beta=-1", ["beta", ">= 0"]),
    ("mc_samples=0", ["mc_samples", ">= 1"]),
    ("latent_dim=2.5", ["latent_dim", "whole number"]),
    ("latent_dim=abc", ["latent_dim", "whole number", "'abc'"]),
    ("mc_samples=2.5", ["mc_samples", "whole number"]),
    ("beta=nan", ["beta", "finite"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1"]),
    ("data.binarize=yes", ["data.binarize", "dynamic"]),
    ("model.activation=swish", ["model.activation", "relu"]),
    # the same kinds of mistake with other keys, values and sizes
    ("latent_dim=-3", ["latent_dim=-3", ">= 1"]),
    ("latent_dim=1e3", ["latent_dim=1000.0", "whole number"]),
    ("latent_dim=true", ["latent_dim=True", "whole number"]),
    ("beta=inf", ["beta=inf", "finite"]),
    ("lr=0", ["lr=0", "> 0"]),
    ("lr=nan", ["lr=nan", "finite"]),
    ("mc_samples=[1,2]", ["mc_samples=[1, 2]", "whole number"]),
    ("trainer.max_epochs=-2", ["trainer.max_epochs=-2", ">= -1"]),
    ("trainer.max_epochs=0", ["trainer.max_epochs=0", "trains nothing"]),
    ("eval.chunk=0", ["eval.chunk=0", ">= 1"]),
    ("eval.nll_samples=-5", ["eval.nll_samples=-5", ">= 0"]),
    ("data.val_size=1.5", ["data.val_size=1.5", "< 1"]),
    ("data.eval_batch_size=2.5", ["data.eval_batch_size=2.5", "whole number"]),
    ("pictures_every_n_epochs=0", ["pictures_every_n_epochs=0", ">= 1"]),
    ("compile=maybe", ["compile='maybe'", "true or false", "'reduce-overhead'"]),
    ("matmul_precision=low", ["matmul_precision='low'", "'highest', 'high' or 'medium'"]),
    ("callbacks.latent_scatter.method=umap", ["callbacks.latent_scatter.method='umap'", "tsne"]),
    ("callbacks.reconstructions.n_images=0", ["callbacks.reconstructions.n_images=0", ">= 1"]),
    ("objective.warmup_steps=-1", ["objective.warmup_steps=-1", ">= 0"]),
    ("model.hidden_dims=[512,0]", ["model.hidden_dims[1]=0", ">= 1"]),
    ("+likelihood.scale=0", ["likelihood.scale=0", "> 0"]),
])
def test_bad_values_fail_before_training_and_name_the_key(compose_train, tmp_path, override,
                                                          words):
    with pytest.raises(Exception) as err:  # noqa: B017 - Hydra wraps some in its own type
        train(compose_train(CPU, override))
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override, words", [
    ("model=transformer", ["model/transformer", "conv", "mlp"]),
    ("data=cifar", ["data/cifar", "mnist", "fashion_mnist"]),
    ("trainer=tpu", ["trainer/tpu", "ddp_cpu", "gpu"]),
])
def test_unknown_names_list_the_options(tmp_path, data_dir, override, words):
    process = run_train([f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", override])
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert all(w in output for w in words), output[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_dir_fails_before_training(compose_train, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        train(compose_train(CPU, f"paths.data_dir={tmp_path / 'nowhere'}", "data.download=false"))


@pytest.fixture
def mlp_run(compose_train, tmp_path):
    run = tmp_path / "mlp"
    train(compose_train(CPU, "trainer.max_epochs=1", *NO_PICTURES, output_dir=run))
    return run


def test_checkpoint_of_another_architecture_is_refused(compose_train, mlp_run, tmp_path):
    cfg = compose_train(CPU, "model=conv", f"resume={mlp_run}", output_dir=tmp_path / "conv")
    with pytest.raises(CheckpointError, match="another model") as err:
        train(cfg)
    assert "MLPVAE" in str(err.value) and "ConvVAE" in str(err.value)


def test_a_file_that_is_not_a_checkpoint_is_refused(compose_train, tmp_path):
    junk = tmp_path / "notes.ckpt"
    junk.write_text("these are my notes, not weights")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        train(compose_train(CPU, f"ckpt_path={junk}"))
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="not a vaelab checkpoint"):
        train(compose_train(CPU, f"ckpt_path={plain}"))


class RunsCode:
    """What an attacker puts in a checkpoint: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(run: Path, marker: Path) -> Path:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = RunsCode(marker)
    path = run / "checkpoints" / "evil.ckpt"
    torch.save(checkpoint, path)
    return path


def test_malicious_checkpoint_is_refused_by_resume_and_generate(compose_train, mlp_run,
                                                                tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(mlp_run, marker)
    with pytest.raises(CheckpointError, match="refused"):
        train(compose_train(CPU, f"ckpt_path={evil}", output_dir=tmp_path / "again"))
    result = subprocess.run([sys.executable, "generate.py", f"ckpt_path={evil}",
                             "pictures=[samples]"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "refused" in result.stderr
    assert not marker.exists()


class PoisonWeights(L.Callback):
    """Turns one weight into NaN just before training step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(module.parameters()).view(-1)[0] = float("nan")


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(compose_train,
                                                                          tmp_path):
    cfg = compose_train(CPU, "trainer.max_epochs=5", *NO_PICTURES,
                        "+callbacks.poison._target_=tests.test_robustness.PoisonWeights",
                        "+callbacks.poison.step=7")
    with pytest.raises(FloatingPointError, match="global step 7"):
        train(cfg)
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 5  # the end of epoch 1: 80 images / 16 per batch
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


class PoisonGradient(L.Callback):
    """Turns one gradient into inf after the backward pass of training step `step` (the loss
    stays finite)."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, module):
        if trainer.global_step == self.step:
            next(module.parameters()).grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("log_every", [50, 8], ids=["fused-check", "logged-norm"])
def test_non_finite_gradient_stops_before_the_weights_change(compose_train, tmp_path,
                                                             log_every):
    """Step 7 is checked by the fused check, or, when it logs (every 8th step), by the norm."""
    cfg = compose_train(CPU, "trainer.max_epochs=5", *NO_PICTURES,
                        f"trainer.log_every_n_steps={log_every}",
                        "+callbacks.poison._target_=tests.test_robustness.PoisonGradient",
                        "+callbacks.poison.step=7")
    with pytest.raises(FloatingPointError, match="non-finite gradient.* at global step 7"):
        train(cfg)
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def payloads(victim: Path, marker: Path) -> dict[str, dict]:
    """Specs that write, truncate or run something when handed to Hydra's instantiate: plain
    dicts and strings only, so weights_only=True loads them without complaint."""
    return {
        "open": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
        "system": {"_target_": "os.system", "_args_": [f"touch {marker}"]},
        "subprocess": {"_target_": "subprocess.run", "args": ["touch", str(marker)]},
        "write_text": {"_target_": "pathlib.Path.write_text",
                       "_args_": [{"_target_": "pathlib.Path", "_args_": [str(victim)]}, "x"]},
        "nested": {"_target_": "vaelab.objectives.ELBO",
                   "beta": {"_target_": "builtins.open", "file": str(victim), "mode": "w"}},
        # interpolations that build a spec when resolved, or write when resolved
        "create": {"_target_": "vaelab.objectives.ELBO",
                   "beta": f"${{oc.create:{{_target_:builtins.open,file:'{victim}',mode:w}}}}"},
        "decode": {"_target_": "vaelab.objectives.ELBO",
                   "beta": f"${{oc.decode:'{{_target_: os.system, _args_: [touch {marker}]}}'}}"},
        "resolver": {"_target_": "vaelab.data.MNISTDataModule",
                     "data_dir": f"${{vaelab.run_dir:null,null,'{marker}'}}"},
    }


def refused_everywhere(calls, victim: Path, marker: Path) -> None:
    from vaelab.loadable import UnsafeSpecError

    for name, call in calls.items():
        with pytest.raises(UnsafeSpecError, match="does not load from files|was refused"):
            call()
        assert victim.read_text() == "precious", name
        assert not marker.exists(), name


@pytest.mark.parametrize("payload", ["open", "system", "subprocess", "write_text", "nested",
                                     "create", "decode", "resolver"])
@pytest.mark.parametrize("key", ["objective", "model", "optimizer"])
def test_checkpoint_hyperparameters_may_not_name_code(compose_train, mlp_run, tmp_path, payload,
                                                      key):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vaelab.cli import config_dir
    from vaelab.cli.eval import evaluate
    from vaelab.cli.generate import generate
    from vaelab.module import VAEModule

    victim, marker = tmp_path / "victim.txt", tmp_path / "marker"
    victim.write_text("precious")
    checkpoint = torch.load(mlp_run / "checkpoints" / "last.ckpt", weights_only=True)
    spec = payloads(victim, marker)[payload]
    checkpoint["hyper_parameters"][key] = spec if key != "model" else {
        **checkpoint["hyper_parameters"]["model"], "prior": spec}
    evil = mlp_run / "checkpoints" / "evil.ckpt"
    torch.save(checkpoint, evil)
    train_cfg = compose_train(CPU, f"ckpt_path={evil}", output_dir=tmp_path / "again")

    def tool(name, *overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(name, overrides=[f"ckpt_path={evil}", f"run_dir={mlp_run}",
                                            *overrides])

    refused_everywhere({
        "load_from_checkpoint": lambda: VAEModule.load_from_checkpoint(evil, weights_only=True),
        "resume": lambda: train(train_cfg),
        "generate": lambda: generate(tool("generate", "pictures=[samples]")),
        "eval": lambda: evaluate(tool("eval", "nll_samples=2")),
    }, victim, marker)


@pytest.mark.parametrize("key, value, words", [
    ("objective", {"_target_": "vaelab.objectives.ELBO", "beta": float("nan")},
     ["objective.beta=nan", "finite"]),
    ("objective", {"_target_": "vaelab.objectives.IWAE", "mc_samples": 0},
     ["objective.mc_samples=0", ">= 1"]),
    ("latent_dim", 2.5, ["latent_dim=2.5", "whole number"]),
    ("likelihood", {"_target_": "vaelab.likelihoods.GaussianLikelihood", "scale": -1.0},
     ["likelihood.scale=-1.0", "> 0"]),
])
def test_checkpoint_values_are_typed_and_in_range(mlp_run, key, value, words):
    from vaelab import runs
    from vaelab.module import VAEModule

    checkpoint = torch.load(mlp_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"][key] = value
    bad = mlp_run / "checkpoints" / "bad.ckpt"
    torch.save(checkpoint, bad)
    for load in (lambda: runs.load_module(bad), lambda: VAEModule.load_from_checkpoint(bad)):
        with pytest.raises(ValueError, match="bad config value in .*bad.ckpt") as err:
            load()
        assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("override, words", [
    ("label=2.5", ["label=2.5", "whole number"]),
    ("label=-1", ["label=-1", ">= 0"]),
    ("pictures=[samples,faces]", ["pictures[1]='faces'", "'manifold'"]),
    ("samples.n=0", ["samples.n=0", ">= 1"]),
    ("manifold.frame=data", ["manifold.frame='data'", "'posterior'"]),
    ("nrow=abc", ["nrow='abc'", "whole number"]),
])
def test_bad_generate_values_name_the_key(mlp_run, override, words):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vaelab.cli import config_dir
    from vaelab.cli.generate import generate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("generate", overrides=[f"run_dir={mlp_run}", override])
    with pytest.raises(ValueError, match="^bad config value") as err:
        generate(cfg)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (mlp_run / "generated").exists()


@pytest.mark.parametrize("payload", ["open", "system", "nested", "create", "decode", "resolver"])
def test_a_run_dirs_config_may_not_name_code(compose_train, tmp_path, payload):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from vaelab.cli import config_dir
    from vaelab.cli.eval import evaluate
    from vaelab.cli.generate import generate

    run = tmp_path / "run"
    cfg = compose_train(CPU, "trainer.max_epochs=1", *NO_PICTURES, output_dir=run)
    train(cfg)
    victim, marker = tmp_path / "victim.txt", tmp_path / "marker"
    victim.write_text("precious")
    saved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                   resolve=True)
    saved["data"] = {**payloads(victim, marker)[payload], "_args_": [[1, 2]]} \
        if payload == "nested" else payloads(victim, marker)[payload]
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(saved), run / ".hydra" / "config.yaml")

    def tool(name, *overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(name, overrides=[f"run_dir={run}", *overrides])

    refused_everywhere({
        "generate": lambda: generate(tool("generate", "pictures=[reconstructions]")),
        "eval": lambda: evaluate(tool("eval", "nll_samples=2")),
    }, victim, marker)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from vaelab import cli

    monkeypatch.setattr(cli, "_CLAIMED", {})
    first = cli.run_dir(None, None, str(tmp_path / "12-00-00"))
    assert cli.run_dir(None, None, str(tmp_path / "12-00-00")) == first  # one process: stable
    monkeypatch.setattr(cli, "_CLAIMED", {})  # another process, the same second
    second = cli.run_dir(None, None, str(tmp_path / "12-00-00"))
    assert second == f"{first}_2" and Path(first).is_dir() and Path(second).is_dir()


def test_a_missing_checkpoint_fails_and_leaves_nothing_behind(data_dir, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", f"ckpt_path={run}/checkpoints/last.ckpt", *TINY],
        cwd=ROOT, env={**os.environ, "VAELAB_DATA_DIR": str(data_dir)}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode != 0 and "does not exist" in result.stderr
    assert not run.exists()


def test_resuming_a_finished_run_is_refused_and_more_epochs_keep_its_metrics(compose_train,
                                                                            mlp_run):
    before = (mlp_run / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="already finished.*trainer.max_epochs=2"):
        train(compose_train(CPU, "trainer.max_epochs=1", *NO_PICTURES, f"resume={mlp_run}",
                            output_dir=mlp_run))
    with pytest.raises(ValueError, match="already finished"):  # a step budget it has reached
        train(compose_train(CPU, "trainer.max_epochs=-1", "+trainer.max_steps=3", *NO_PICTURES,
                            f"resume={mlp_run}", output_dir=mlp_run))
    assert (mlp_run / "metrics.json").read_bytes() == before  # not rewritten
    train(compose_train(CPU, "trainer.max_epochs=2", *NO_PICTURES, f"resume={mlp_run}",
                        output_dir=mlp_run))
    old, new = json.loads(before), json.loads((mlp_run / "metrics.json").read_text())
    assert new["time/train_s"] > old["time/train_s"]  # both fits' time
    assert set(old) <= set(new) and new["train/loss"] != old["train/loss"]  # epoch 2's numbers


def test_a_copied_run_dir_never_uses_the_originals_checkpoint(mlp_run, tmp_path):
    import shutil

    from vaelab import runs

    copy = tmp_path / "copy"
    shutil.copytree(mlp_run, copy)
    assert runs.resolve(str(copy), None)[1].parent == copy / "checkpoints"  # relative: its own
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["best_checkpoint"] = str((mlp_run / "checkpoints" / "last.ckpt").resolve())
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(FileNotFoundError, match="outside"):
        runs.resolve(str(copy), None)


@pytest.mark.parametrize("override", ["chunk=0", "nll_samples=0", "batch_size=-1", "limit=0",
                                      "nll_samples=2.5", "chunk=abc", "split=validation"])
def test_bad_eval_values_name_the_key(mlp_run, override):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vaelab.cli import config_dir
    from vaelab.cli.eval import evaluate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval", overrides=[f"run_dir={mlp_run}", override])
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"^bad config value: {key}=\W?{value}\W?: should be"):
        evaluate(cfg)


def test_zero_epochs_is_refused(compose_train):
    with pytest.raises(ValueError, match="trainer.max_epochs=0"):
        train(compose_train(CPU, "trainer.max_epochs=0"))


def relabelled(b: bytes, count: int) -> bytes:
    """A consistent labels IDX file holding only the first `count` labels."""
    import struct

    return b[:4] + struct.pack(">I", count) + b[8:8 + count]


def resized(b: bytes, side: int) -> bytes:
    """A consistent images IDX file of the same count with smaller images (cropped)."""
    import struct

    n, h, w = struct.unpack(">3I", b[4:16])
    images = torch.frombuffer(bytearray(b[16:]), dtype=torch.uint8).view(n, h, w)
    return b[:4] + struct.pack(">3I", n, side, side) + images[:, :side, :side].numpy().tobytes()


@pytest.mark.parametrize("victim, damage, words", [
    ("t10k-images-idx3-ubyte", lambda b: b[:-100], "truncated or corrupt"),
    ("t10k-images-idx3-ubyte", lambda b: b[:6], "inside its header"),
    ("t10k-images-idx3-ubyte", lambda b: b"\x00\x00\x0d\x03" + b[4:], "not an IDX file"),
    ("train-labels-idx1-ubyte", lambda b: b[:1], "not an IDX file"),
    ("train-labels-idx1-ubyte", lambda b: b + b"\x00", "truncated or corrupt"),
    ("t10k-labels-idx1-ubyte", lambda b: relabelled(b, 19), r"labels of shape \[19\]"),
    ("t10k-images-idx3-ubyte", lambda b: resized(b, 27), r"shape \[32, 27, 27\]"),
])
def test_a_damaged_idx_file_is_named(compose_train, data_dir, tmp_path, victim, damage, words):
    import shutil

    from hydra.utils import instantiate

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    path = copy / "MNIST" / "raw" / victim
    path.write_bytes(damage(path.read_bytes()))
    datamodule = instantiate(compose_train(CPU, f"paths.data_dir={copy}").data)
    with pytest.raises(ValueError, match=words) as err:
        datamodule.prepare_data()
    assert victim in str(err.value)


def test_a_checkpoint_saved_with_the_weights_that_gave_a_nan_is_rolled_back(compose_train,
                                                                             tmp_path):
    """With last.ckpt saved every step, the weights that give the NaN at step 7 were saved at
    step 7: last.ckpt goes back to step 6, and a resume from it trains on."""
    common = [CPU, *NO_PICTURES, "callbacks.periodic_checkpoint.every_n_train_steps=1"]
    with pytest.raises(FloatingPointError, match="rolled back to step 6: resume from it"):
        train(compose_train(*common, "trainer.max_epochs=5",
                            "+callbacks.poison._target_=tests.test_robustness.PoisonWeights",
                            "+callbacks.poison.step=7"))
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6
    resumed = train(compose_train(*common, "trainer.max_epochs=3", f"resume={tmp_path}",
                                  output_dir=tmp_path))
    assert math.isfinite(resumed["val/nelbo"])
    assert not (tmp_path / "checkpoints" / ".last.previous.ckpt").exists()


def test_a_run_that_diverges_at_once_keeps_no_bad_checkpoint(compose_train, tmp_path):
    """lr=1e3: the first update already gives inf; the last.ckpt holding it is removed."""
    with pytest.raises(FloatingPointError, match="global step 1 .*was removed; start again"):
        train(compose_train(CPU, *NO_PICTURES, "trainer.max_epochs=5", "lr=1e3",
                            "likelihood=gaussian", "optimizer.fused=false",
                            "callbacks.periodic_checkpoint.every_n_train_steps=1"))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_run_dir_whose_config_cannot_be_read_ends_eval_with_one_message(mlp_run):
    from tests.conftest import compose_tool
    from vaelab.cli.eval import evaluate
    from vaelab.cli.generate import generate
    from vaelab.errors import BadValue

    config = mlp_run / ".hydra" / "config.yaml"
    config.parent.mkdir(exist_ok=True)
    for damage in ("key: [unclosed\n", "- a list\n- not a config\n"):
        config.write_text(damage)
        for tool, run in (("eval", evaluate), ("generate", generate)):
            with pytest.raises(BadValue, match="config.yaml"):
                run(compose_tool(tool, f"run_dir={mlp_run}"))
    config.write_text("!!python/object/apply:os.system ['true']\n")  # and as a user sees it
    result = subprocess.run([sys.executable, "eval.py", f"run_dir={mlp_run}", "nll_samples=2",
                             "limit=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and str(config) in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
