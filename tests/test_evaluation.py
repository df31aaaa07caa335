"""Evaluation against closed forms, the IWAE bound and schedules, and the eval command."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import N_TEST, ROOT, compose_tool
from tests.test_objectives import LinearGaussian
from tests.test_pictures import linear_vae
from vaelab import evaluation
from vaelab.objectives import ELBO, IWAE
from vaelab.training import train


def test_importance_sampled_nll_converges_to_the_exact_log_likelihood():
    model = LinearGaussian()
    vae = model.vae(mean_shift=0.6, logvar_shift=0.8)  # a poor q: the ELBO is loose
    x = model.sample_x(32)
    exact = model.log_px(x)
    torch.manual_seed(0)
    errors, elbos = {}, {}
    for k in (1, 10, 100, 5000):
        log_px, elbo, _ = evaluation.importance_sampled(vae, x, samples=k, chunk=64)
        errors[k] = (log_px - exact).abs().mean().item()
        elbos[k] = elbo
    assert errors[5000] < 0.06 and errors[1] > 3  # 0.036 and 5.2 nats with this seed
    assert errors[5000] < errors[100] < errors[10] < errors[1]
    # the ELBO estimate does not converge to log p(x): its gap is KL(q || posterior) ~ 4 nats
    assert (exact - elbos[5000]).mean() > 3


def test_elbo_below_iwae_below_log_likelihood():
    model = LinearGaussian()
    vae, x = model.vae(mean_shift=0.4, logvar_shift=-0.5), model.sample_x(64)
    exact = model.log_px(x).mean().item()
    torch.manual_seed(0)
    with torch.no_grad():
        bounds = {k: -torch.stack([IWAE(mc_samples=k)(vae, x)["niwae"] for _ in range(200)]).mean()
                  for k in (1, 5, 50)}
        elbo = torch.stack([ELBO(mc_samples=1)(vae, x)["elbo"] for _ in range(200)]).mean()
    assert bounds[1] == pytest.approx(elbo.item(), abs=0.05)  # IWAE_1 is the ELBO
    assert elbo < bounds[5] < bounds[50] < exact


def test_reconstruction_error_against_the_mean_image():
    """recon_mse is the squared error of the mean reconstruction per value; the ratio divides
    the summed error by the error of the data's own mean image."""
    vae = linear_vae(latent_dim=4, active=(1, 3))
    batches = [(torch.randn(30, 1, 1, 6) + 2, torch.zeros(30)) for _ in range(3)]
    scores = evaluation.score(vae, batches, samples=2)
    x = torch.cat([b[0] for b in batches]).flatten(1).double()
    with torch.no_grad():
        recon = vae.decode(vae.encode(x.float().reshape(-1, 1, 1, 6)).mean).mean.flatten(1)
    assert scores.recon_mse.tolist() == pytest.approx((recon - x).pow(2).mean(1).tolist(),
                                                      rel=1e-5)
    spread = (x - x.mean(0)).pow(2).mean(1).sum().item()
    assert scores.spread == pytest.approx(spread, rel=1e-9)
    ratio = evaluation.summary(scores, vae, 2)["eval/recon_mse_ratio"]
    assert ratio == pytest.approx(scores.recon_mse.sum().item() / spread, rel=1e-6) and ratio > 0


def test_active_units_count_only_units_that_vary_with_x():
    vae = linear_vae(latent_dim=4, active=(1, 3))
    batches = [(torch.randn(50, 1, 1, 6), torch.zeros(50)) for _ in range(2)]
    scores = evaluation.score(vae, batches, samples=4)
    assert evaluation.active_units(scores.means) == 2
    kl = scores.kl_per_dim.mean(0)
    assert kl[0] < 1e-6 and kl[2] < 1e-6 and kl[1] > 0.1 and kl[3] > 0.1


def test_bits_per_dim():
    model = linear_vae()
    nll = torch.full((5,), 6 * math.log(2))  # 1 bit per value in nats
    bits = evaluation.bits_per_dim(nll, model).item()
    assert bits == pytest.approx(1 + 8)  # + log2(256) per value


def test_kl_warmup_follows_the_step_and_free_bits_floor_each_dimension():
    objective = ELBO(beta=2.0, warmup_steps=100)
    assert [objective.beta_at(s) for s in (0, 50, 100, 1000)] == [0.0, 1.0, 2.0, 2.0]
    model = LinearGaussian()
    vae, x = model.vae(), model.sample_x(8)
    torch.manual_seed(0)
    out = ELBO(beta=2.0, warmup_steps=100)(vae, x, step=50)
    assert out["beta"] == 1.0
    assert out["loss"].item() == pytest.approx((out["recon"] + out["kl"]).item(), rel=1e-5)
    free = ELBO(free_bits=5.0)
    kl_per_dim = torch.tensor([[0.1, 7.0], [0.3, 9.0]])
    assert free.free_bits_kl(kl_per_dim).item() == pytest.approx(5.0 + 8.0)  # max(5, 0.2) + 8


def test_training_with_iwae_warmup_and_eval_at_the_end(compose_train, tmp_path):
    metrics = train(compose_train("trainer.accelerator=cpu", "trainer.max_epochs=1",
                                  "objective=iwae", "mc_samples=3", "eval.nll_samples=20"))
    assert metrics["eval/nll"] <= metrics["eval/nelbo"]
    assert metrics["eval/examples"] == N_TEST and metrics["eval/nll_samples"] == 20
    assert math.isfinite(metrics["test/niwae"]) and metrics["test/niwae"] <= metrics["test/nelbo"]
    warm = train(compose_train("trainer.accelerator=cpu", "trainer.max_epochs=1",
                               "objective.warmup_steps=10", output_dir=tmp_path / "warm"))
    assert warm["train/beta"] == pytest.approx(0.2)  # mean of steps 0..4 / 10


def test_eval_command_writes_json_csv_tensorboard_and_auroc(compose_train, image_dir,
                                                            tmp_path):
    cfg = compose_train("trainer.accelerator=cpu", "trainer.max_epochs=2")
    train(cfg)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                   tmp_path / ".hydra" / "config.yaml", resolve=True)
    (tmp_path / "eval.json").write_text('{"eval/nll": 1.0}')  # an earlier in-domain evaluation
    result = subprocess.run([sys.executable, "eval.py", f"run_dir={tmp_path}", "nll_samples=50",
                             "chunk=16", "ood.dataset=fashion_mnist"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "eval.json").read_text() == '{"eval/nll": 1.0}'  # kept
    assert "test: NLL, K=50" in result.stderr  # the progress bar
    results = json.loads((tmp_path / "eval_ood-fashion_mnist_K50.json").read_text())
    assert results["eval/nll"] <= results["eval/nelbo"]
    assert results["eval/nll"] == pytest.approx(results["eval/bits_per_dim"] * 784 * math.log(2))
    assert 0 <= results["eval/active_units"] <= 16
    assert sum(results[f"eval/kl_dim_{u}"] for u in range(16)) == pytest.approx(
        results["eval/kl"], rel=1e-4)
    assert 0.0 <= results["eval/auroc_nll"] <= 1.0
    with open(tmp_path / "scores_ood-fashion_mnist_K50.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * N_TEST and {r["set"] for r in rows} == {"test", "ood"}
    assert all(float(r["nll"]) <= float(r["nelbo"]) + 1e-3 for r in rows)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Scalars("eval/nll")[-1].value == pytest.approx(results["eval/nll"])

    # the same tool in-process (the command line is checked above): a whole other DataModule
    from vaelab.cli.eval import evaluate

    evaluate(compose_tool("eval", f"run_dir={tmp_path}", "nll_samples=10",
                          "+ood._target_=vaelab.data.ImageFolderDataModule",
                          f"+ood.path={image_dir}", "+ood.image_size=28", "+ood.channels=1",
                          "+ood.val_fraction=0", "+ood.test_fraction=0.5",
                          f"out_dir={tmp_path / 'folder'}"))
    name = f"ood-{image_dir.name}_K10"
    with open(tmp_path / "folder" / f"scores_{name}.csv") as file:
        ood_rows = [r for r in csv.DictReader(file) if r["set"] == "ood"]
    assert 0 < len(ood_rows) < 12  # the folder's test split, scored by the MNIST model
    assert 0.0 <= json.loads((tmp_path / "folder" / f"eval_{name}.json").read_text())[
        "eval/auroc_nll"] <= 1.0


def test_iwae_paper_schedule():
    from vaelab.schedules import iwae_paper

    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = iwae_paper(optimizer)
    lrs = []
    for _ in range(3281):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert lrs[3] == pytest.approx(1e-3 * 10 ** (-1 / 7)) and lrs[4] == pytest.approx(
        1e-3 * 10 ** (-2 / 7))
    assert lrs[3279] == pytest.approx(1e-3 * 10 ** (-1)) and lrs[3280] == lrs[3279]


def test_iwae_paper_schedule_squeezed_into_a_budget():
    from vaelab.schedules import iwae_paper

    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = iwae_paper(optimizer, epochs=328)  # the paper's stages, a tenth as long
    lrs = []
    for _ in range(330):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # Stage ends at 0.1, 0.4, 1.3, 4, 12.1, 36.4, 109.3, 328; an epoch takes its midpoint's.
    assert lrs[0] == pytest.approx(1e-3 * 10 ** (-2 / 7))  # stages 0 and 1 end inside epoch 0
    assert lrs[4] == pytest.approx(1e-3 * 10 ** (-4 / 7))
    assert lrs[35] == pytest.approx(1e-3 * 10 ** (-5 / 7))
    assert lrs[36] == pytest.approx(1e-3 * 10 ** (-6 / 7))
    assert lrs[327] == pytest.approx(1e-4) and lrs[329] == lrs[327]
    with pytest.raises(ValueError, match="scheduler.epochs"):
        iwae_paper(optimizer, epochs=0)
