"""Multiruns that summarize themselves, Optuna, launchers, and DDP on the CPU."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, TINY
from vaelab.cli import config_dir, is_sweep, sweep_subdir
from vaelab.sweeps import summarize


def train_py(args, data_dir, cwd, timeout=600, status=0):
    """`python train.py ...` from `cwd`, so that default outputs/ land in a temporary folder."""
    env = {**os.environ, "VAELAB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    flags = [a for a in args if a == "-m"]  # flags before overrides
    overrides = [a for a in args if a != "-m"]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, *TINY,
                             "trainer.max_epochs=1", *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == status, (result.stdout + result.stderr)[-4000:]
    return result


def rows(sweep_dir):
    with open(sweep_dir / "summary.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def sweep_2x2(data_dir, tmp_path_factory):
    """One 2x2 multirun with TensorBoard and MLflow, shared by the tests that read it (each
    test that changes it works on a copy)."""
    cwd = tmp_path_factory.mktemp("sweep_2x2")
    sweep = cwd / "sweep"
    # objective.beta, not the top-level beta: the summary reports the beta that was built
    train_py(["-m", "latent_dim=2,4", "objective.beta=0.5,4", f"hydra.sweep.dir={sweep}",
              "logger=[tensorboard,mlflow]"], data_dir, cwd)
    return sweep


def test_a_2x2_multirun_names_its_jobs_and_summarizes_itself(sweep_2x2):
    sweep, tmp_path = sweep_2x2, sweep_2x2.parent
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0_latent_dim=2,objective.beta=0.5", "1_latent_dim=2,objective.beta=4",
                    "2_latent_dim=4,objective.beta=0.5", "3_latent_dim=4,objective.beta=4"]
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "metrics.json").is_file()
    table = rows(sweep)
    assert len(table) == 4 and {r["status"] for r in table} == {"ok"}
    assert {(r["latent_dim"], r["beta"]) for r in table} == {("2", "0.5"), ("2", "4"),
                                                             ("4", "0.5"), ("4", "4")}
    for row in table:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["test/nelbo"]) == pytest.approx(metrics["test/nelbo"])
        assert float(row["test/kl"]) >= 0 and float(row["train_time_s"]) > 0
    markdown = (sweep / "summary.md").read_text()
    assert markdown.count("| ok |") == 4 and "rate_distortion.png" in markdown
    header = markdown.splitlines()[2].split(" | ")
    beta_cells = {line.split(" | ")[header.index("beta")] for line in markdown.splitlines()
                  if line.endswith("| ok |")}
    assert beta_cells == {"0.50", "4"}
    assert (sweep / "rate_distortion.png").stat().st_size > 10_000
    events = EventAccumulator(str(sweep / "tensorboard"))
    events.Reload()
    assert events.Tags()["images"] == ["sweep/rate_distortion"]
    assert not (tmp_path / "outputs" / "train" / "runs").exists()
    # MLflow: each job a run in its own store, the summary a run in the sweep dir's store
    summary = mlflow_runs(sweep / "mlruns")
    assert [r.info.run_name for r in summary] == ["summary of sweep"]
    assert len(summary_history(sweep / "mlruns", summary[0], "test/nelbo")) == 4
    for job in jobs:
        (run,) = mlflow_runs(sweep / job / "mlruns")
        assert run.data.metrics["test/nelbo"] == pytest.approx(
            json.loads((sweep / job / "metrics.json").read_text())["test/nelbo"], rel=1e-6)


def mlflow_runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")  # no file-store switch needed
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def summary_history(store, run, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    names = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert {"summary.md", "summary.csv"} <= set(names), names
    assert any(p.startswith("images") for p in names), names
    return client.get_metric_history(run.info.run_id, key)


def test_a_failed_job_is_a_row_not_a_crash(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = train_py(["-m", "latent_dim=2,0", f"hydra.sweep.dir={sweep}"], data_dir, tmp_path,
                      status=1)  # the sweep goes on, summarizes, then says a job failed
    assert "1 of 2 jobs failed (1_latent_dim=0)" in result.stdout + result.stderr
    table = {r["latent_dim"]: r for r in rows(sweep)}
    assert table["2"]["status"] == "ok"
    assert table["0"]["status"] == \
        "failed: ConfigError: bad config value: latent_dim=0: should be >= 1"
    assert "failed: ConfigError" in (sweep / "summary.md").read_text()


def test_summarize_on_demand(sweep_2x2, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(sweep_2x2, sweep)
    for name in ("summary.csv", "summary.md", "rate_distortion.png", "mlruns", "tensorboard"):
        shutil.rmtree(sweep / name) if (sweep / name).is_dir() else (sweep / name).unlink()
    killed = "1_latent_dim=2,objective.beta=4"
    (sweep / killed / "metrics.json").unlink()  # as if that job had been killed
    result = subprocess.run([sys.executable, "-m", "vaelab.cli.summarize", f"sweep_dir={sweep}",
                             "logger=[tensorboard,mlflow]"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = mlflow_runs(sweep / "mlruns")
    assert len(summary_history(sweep / "mlruns", summary, "test/nelbo")) == 3  # three jobs done
    statuses = {r["job"]: r["status"] for r in rows(sweep)}
    assert statuses.pop(killed) == "incomplete (killed, or still running)"
    assert set(statuses.values()) == {"ok"} and len(statuses) == 3
    assert (sweep / "rate_distortion.png").is_file()
    with pytest.raises(FileNotFoundError, match="no job folders"):
        summarize(tmp_path / "empty")


def test_optuna_search_reports_its_best_trial(data_dir, tmp_path):
    sweep = tmp_path / "optuna"
    train_py(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
              f"hydra.sweep.dir={sweep}"], data_dir, tmp_path)
    table = rows(sweep)
    assert len(table) == 2 and all(r["status"] == "ok" for r in table)
    assert {"lr", "latent_dim", "beta"} <= set(table[0])
    best = min(float(r["val/nelbo"]) for r in table)
    markdown = (sweep / "summary.md").read_text()
    assert "Best trial (Optuna)" in markdown and f"value: {best:.2f}" in markdown


def test_ddp_cpu_run_has_one_dir_and_logs_what_rank_zero_synced(data_dir, tmp_path):
    train_py(["trainer=ddp_cpu"], data_dir, tmp_path)
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch000-step3.ckpt", "last.ckpt"]  # 80 images / 16 per batch / 2 ranks, rounded up
    metrics = json.loads((run / "metrics.json").read_text())
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("val/nelbo", "test/nelbo", "test/kl"):
        assert events.Scalars(f"hp/{key}")[-1].value == pytest.approx(metrics[key], rel=1e-6)
    assert events.Scalars("val/nelbo")[-1].value == pytest.approx(metrics["val/nelbo"], rel=1e-6)
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same dir


def test_ddp_inside_a_multirun(data_dir, tmp_path):
    sweep = tmp_path / "ddp_sweep"
    train_py(["-m", "trainer=ddp_cpu", "beta=1,4", f"hydra.sweep.dir={sweep}"], data_dir,
             tmp_path)
    assert [r["status"] for r in rows(sweep)] == ["ok", "ok"]
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == [
        "0_beta=1", "1_beta=4"]
    assert not (tmp_path / "outputs").exists()  # no stray run dirs from the ranks


def test_slurm_launcher_config_follows_the_trainer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp",
                                          "trainer.devices=4", "trainer.num_nodes=2",
                                          "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.tasks_per_node,
            launcher.gpus_per_node) == ("gpu", 2, 4, 4)
    assert launcher.timeout_min == 240


def test_job_names_keep_only_swept_keys(monkeypatch):
    assert is_sweep("1,2") and is_sweep("range(1,3)") and not is_sweep("[1,2]")
    assert not is_sweep("'a,b'") and not is_sweep("0.5")
    monkeypatch.setattr("vaelab.cli.LAUNCH_ARGV", ("train.py", "-m", "beta=1,4", "seed=3",
                                                   "model.hidden_dims=[4,2]"))
    assert sweep_subdir(1, ["beta=4", "seed=3", "model.hidden_dims=[4,2]"], None) == "1_beta=4"
    assert sweep_subdir(0, ["lr=0.00190303683817358", "seed=3"], {"lr": "x"}) == "0_lr=0.001903"
    assert sweep_subdir(2, ["seed=3"], None) == "2"


def test_sweeps_in_one_folder_name_get_their_own_folders(data_dir, tmp_path):
    """The default sweep dir is claimed like a run dir (`vaelab.claim`): a second sweep started
    in the same second writes to `<time>_2`, and joblib's worker processes, which resolve the
    config again, still join the folder their sweep claimed, each with its share of the CPU
    threads."""
    claimed = "hydra.sweep.dir=${vaelab.claim:" + str(tmp_path / "sweep") + "}"
    train_py(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "latent_dim=2,3",
              claimed], data_dir, tmp_path)
    train_py(["-m", "latent_dim=2", claimed], data_dir, tmp_path)
    assert [r["status"] for r in rows(tmp_path / "sweep")] == ["ok", "ok"]
    assert [r["status"] for r in rows(tmp_path / "sweep_2")] == ["ok"]
    threads = [json.loads(p.read_text())["torch_threads"]
               for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert threads == [max(1, os.cpu_count() // 2)] * 2  # joblib's 2 jobs share the cores
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sweep")) == [
        "sweep", "sweep_2"]


def test_a_job_whose_saved_config_is_damaged_is_a_row_not_a_crash(tmp_path):
    from vaelab.sweeps import job_row

    job = tmp_path / "0_beta=1"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- beta=1\n")
    (job / ".hydra" / "config.yaml").write_text("!!python/name:os.system\n")
    row = job_row(job)
    assert row["job"] == "0_beta=1" and row["status"].startswith("unreadable:")
    assert "config.yaml" in row["status"]
