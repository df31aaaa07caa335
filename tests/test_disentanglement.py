"""Disentanglement end to end: dSprites runs with each objective, their scores in metrics.json,
eval.json, TensorBoard and the sweep summary."""

import json
import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab import scores, sweeps
from vaelab.cli import config_dir
from vaelab.training import train

# a narrow net and a few steps: the point is the plumbing, not the numbers
DSPRITES = ["experiment=dsprites_bvae", "data.source=generated", "model.hidden_dims=[64]",
            "trainer.accelerator=cpu", "trainer.max_steps=6",
            "trainer.val_check_interval=3", "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1", "data.val_size=500", "data.test_size=500",
            "eval.disentanglement=quick", "pictures_every_n_epochs=1"]


@pytest.fixture(scope="module")
def dsprites_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dsprites")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=DSPRITES, return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(run)
    HydraConfig().set_config(cfg)
    metrics = train(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                   run / ".hydra" / "config.yaml")
    GlobalHydra.instance().clear()
    return run, metrics


def test_a_run_on_factor_data_ends_with_its_scores(dsprites_run):
    run, metrics = dsprites_run
    saved = json.loads((run / "metrics.json").read_text())
    for name in scores.NAMES:
        value = saved[f"disentanglement/{name}"]
        assert 0.0 <= value <= 1.0 and value == metrics[f"disentanglement/{name}"], name
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "pictures/traversals" in events.Tags()["images"]
    assert events.Scalars("disentanglement/mig")[-1].value == pytest.approx(
        saved["disentanglement/mig"])
    hparams = (run / "tensorboard").glob("**/events.out.tfevents.*")
    assert any(b"hp/disentanglement/mig" in p.read_bytes() for p in hparams)


def test_eval_scores_a_run_again(dsprites_run):
    from vaelab.cli.eval import evaluate

    run, metrics = dsprites_run
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("eval", overrides=[f"run_dir={run}", "nll_samples=2", "limit=20",
                                         "disentanglement=quick", "seed=42"])
    results = evaluate(cfg)
    assert json.loads((run / "eval_K2_limit20.json").read_text())["disentanglement/mig"] == \
        results["disentanglement/mig"]
    # the same seed (the run's), samples and (best) weights: the training run's numbers
    assert results["disentanglement/mig"] == pytest.approx(metrics["disentanglement/mig"])


def test_eval_refuses_scores_without_factors(tmp_path, compose_train):
    from vaelab.cli.eval import evaluate

    train(compose_train("trainer.accelerator=cpu", "trainer.max_epochs=1"))
    (tmp_path / ".hydra").mkdir()
    cfg = compose_train("trainer.accelerator=cpu")
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                   tmp_path / ".hydra" / "config.yaml")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"run_dir={tmp_path}", "nll_samples=2",
                                              "limit=10", "disentanglement=true"])
    with pytest.raises(ValueError, match="needs data with known factors"):
        evaluate(eval_cfg)


@pytest.mark.parametrize("objective, logged", [
    ("betatc", ["mi", "tc", "dwkl"]), ("capacity", ["capacity"]), ("dip_vae", ["dip"]),
])
def test_each_disentangling_objective_trains_and_logs_its_parts(compose_train, tmp_path,
                                                                objective, logged):
    metrics = train(compose_train(*DSPRITES, f"objective={objective}", "eval.disentanglement=off",
                                  tiny=False))
    for key in ("loss", "recon", "kl", "nelbo", *logged):
        assert math.isfinite(metrics[f"val/{key}"]), key
    assert not any(k.startswith("disentanglement/") for k in metrics)  # switched off


def test_the_sweep_plot_has_one_panel_per_score_and_one_line_per_method():
    rows = [{"status": "ok", "beta": beta, "latent_dim": 10, "method": method, "seed": seed,
             **{f"disentanglement/{n}": 0.1 * beta + seed * 0.01 for n in scores.NAMES}}
            for method in ("ELBO", "BetaTCVAE") for beta in (1, 4, 16) for seed in (0, 1, 2)]
    rows.append({"status": "failed: x", "beta": 2, "latent_dim": 10, "method": "ELBO"})
    figure = sweeps.scores_figure(rows)
    assert len(figure.axes) == len(scores.NAMES)
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2 and list(lines[0].get_xdata()) == [1, 4, 16]
    assert list(lines[0].get_ydata()) == pytest.approx([0.11, 0.41, 1.61])  # mean over seeds


@pytest.mark.slow
def test_a_beta_sweep_on_dsprites_summarizes_its_scores(tmp_path):
    """The issue's command, with a few steps per job: 9 jobs, their scores in summary.md and the
    scores-vs-beta figure."""
    import csv
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "experiment=dsprites_bvae",
         "data.source=generated", "beta=1,4,16", "seed=0,1,2", "trainer.max_steps=30",
         "trainer.val_check_interval=30", "+trainer.limit_val_batches=2",
         "+trainer.limit_test_batches=2", "eval.disentanglement=quick",
         f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep / "summary.csv") as file:
        table = list(csv.DictReader(file))
    assert len(table) == 9 and {r["status"] for r in table} == {"ok"}
    assert all(0 <= float(r["disentanglement/mig"]) <= 1 for r in table)
    assert "disentanglement/mig" in (sweep / "summary.md").read_text()
    assert (sweep / "scores_vs_beta.png").stat().st_size > 10_000
