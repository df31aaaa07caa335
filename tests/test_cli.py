"""`python train.py ...` exactly as a user types it, as a subprocess on generated data."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY


def run(args, data_dir, cwd=ROOT, executable=(sys.executable, "train.py")):
    env = {**os.environ, "VAELAB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*executable, *args, *TINY], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_conv_latent_2_as_written(data_dir, tmp_path):
    result = run(["model=conv", "latent_dim=2", "trainer.max_epochs=1",
                  f"hydra.run.dir={tmp_path}"], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # the console: progress, the metrics table, where the results are and what to run next;
    # Lightning's start-up lines go to train.log only
    console = result.stdout + result.stderr
    for noise in ("litlogger", "LeafSpec", "TPU available", "GPU available", "Seed set to",
                  "smaller than the logging interval"):
        assert noise not in console, noise
    assert "test/nelbo" in console and "run finished:" in console
    assert f"vaelab-eval run_dir={tmp_path}" in console
    log = (tmp_path / "train.log").read_text()
    assert "GPU available" in log and "metrics written to" in log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/nelbo"] > 0 and metrics["test/kl"] >= 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["latent_dim"] == 2
    assert ckpt["hyper_parameters"]["model"]["_target_"] == "vaelab.models.ConvVAE"


def test_compiling_for_the_cpu_does_not_warn_about_a_missing_cuda_runtime():
    import logging

    import vaelab.cli  # noqa: F401  (its import sets the console's filters)

    def passes(message):
        record = logging.LogRecord("torch.utils.cpp_extension", logging.WARNING, __file__, 0,
                                   message, ("/usr/local",), None)
        return bool(logging.getLogger("torch.utils.cpp_extension").filter(record))

    assert not passes("No CUDA runtime is found, using CUDA_HOME='%s'")
    assert passes("Error building extension '%s'")  # other warnings still reach the console


def test_console_script_and_default_output_dir(data_dir, tmp_path):
    """The installed `vaelab-train` from another directory: outputs land under ./outputs there."""
    script = shutil.which("vaelab-train", path=os.path.dirname(sys.executable))
    assert script, "vaelab-train is not installed next to this Python"
    result = run(["data=fashion_mnist", "model=mlp", "beta=4", "debug=fdr"], data_dir,
                 cwd=tmp_path, executable=(script,))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
    assert not (runs[0] / "checkpoints").exists()  # debug=fdr keeps no checkpoint


@pytest.mark.parametrize("override, words", [
    ("model=transformer", ["model", "mlp", "conv"]),
    ("lattent_dim=3", ["lattent_dim"]),
])
def test_config_mistakes_fail_before_training_and_name_the_key(data_dir, tmp_path, override,
                                                               words):
    result = run([override, f"hydra.run.dir={tmp_path}"], data_dir)
    assert result.returncode != 0
    assert all(w in result.stderr for w in words), result.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_a_user_error_prints_its_message_alone(tmp_path):
    """No data offline: the message says where the files go, without a traceback (which
    HYDRA_FULL_ERROR=1 still shows)."""
    empty = tmp_path / "data"
    empty.mkdir()
    args = ["data.download=false", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run(args, empty)
    console = result.stdout + result.stderr
    assert result.returncode == 1
    assert "MNIST not found in" in console and "VAELAB_DATA_DIR" in console
    assert "Traceback" not in console and "Error executing job" not in console
    assert not (tmp_path / "run" / "checkpoints").exists()

    env = {**os.environ, "VAELAB_DATA_DIR": str(empty), "HYDRA_FULL_ERROR": "1"}
    full = subprocess.run([sys.executable, "train.py", *args, *TINY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 1 and "Traceback" in full.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_trainer_gpu_without_a_gpu_says_so(data_dir, tmp_path):
    result = run(["trainer=gpu", f"hydra.run.dir={tmp_path}"], data_dir)
    console = result.stdout + result.stderr
    assert result.returncode == 1
    assert "no GPU was found" in console and "trainer=ddp_cpu" in console
    assert "Traceback" not in console and "MisconfigurationException" not in console
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("script", "args"), [
    ("train", ["--help"]), ("train", ["--cfg", "job"]), ("train", ["--info"]),
    ("train", ["latent_dim=0"]), ("eval", ["--help"]), ("eval", ["nll_samples=0"]),
    ("generate", ["--help"]), ("generate", ["samples.n=0"]), ("summarize", ["--help"]),
    ("compress", ["--help"]), ("compress", ["precision=2"]), ("decompress", ["--help"])])
def test_the_command_line_answers_without_importing_torch(script, args, tmp_path):
    """--help, --cfg, --info and a bad value must not wait for torch and Lightning to load."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('HEAVY', [m for m in ('torch', 'lightning', "
            "'matplotlib') if m in sys.modules]))\n"
            f"from vaelab.cli.{script} import main\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code, f"hydra.run.dir={tmp_path}", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    if "=" in args[0]:  # a bad value: one message naming the key, exit status 1
        assert result.returncode == 1 and args[0].split("=")[0] in result.stderr
    else:
        assert result.returncode == 0 and result.stdout.strip()


def test_the_libraries_are_imported_once_collected_then_frozen_and_nothing_else_is():
    """What the run imports is frozen (no collection walks it again); garbage made before it is
    collected first, and a second job in the same process freezes nothing more."""
    code = ("import gc, weakref\n"
            "from vaelab.cli import collector_paused\n"
            "class Node: pass\n"
            "garbage = Node(); garbage.me = garbage; dead = weakref.ref(garbage); del garbage\n"
            "with collector_paused():\n"
            "    assert not gc.isenabled()\n"
            "    import torch\n"
            "frozen = gc.get_freeze_count()\n"
            "later = Node(); later.me = later; alive = weakref.ref(later); del later\n"
            "with collector_paused():\n"
            "    assert gc.isenabled()\n"
            "gc.collect()\n"
            "print(frozen > 100_000, dead() is None, gc.get_freeze_count() == frozen,\n"
            "      alive() is None, gc.isenabled())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["True"] * 5, result.stdout + result.stderr
