"""The VQ-VAE: its point-mass posterior and -log p(codes) KL, the gated PixelCNN prior's
causality, stage two on cached codes (train, resume, eval, generate, refusals), the codebook
numbers in TensorBoard, and FID / KID."""

import math
import urllib.error
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_families import compose_tool, save_run_config
from vaelab import evaluation
from vaelab.cli.eval import evaluate
from vaelab.cli.generate import generate
from vaelab.errors import BadValue, MissingFile
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.loadable import UnsafeSpecError
from vaelab.models import VQVAE, PixelCNNPrior
from vaelab.models.pixelcnn import GatedPixelCNN
from vaelab.objectives import ELBO
from vaelab.sample_quality import fid_kid, inception_metrics
from vaelab.training import train

CPU = "trainer.accelerator=cpu"
SMALL_VQ = ["model=vqvae", "latent_dim=4", "model.codebook_size=16", "model.hidden=16",
            "model.residual_hidden=8", "model.residual_blocks=1"]
SMALL_PRIOR = ["experiment=vqvae_prior", "prior.channels=8", "prior.layers=2",
               "prior_batch_size=16"]
STAGE_TWO_PICTURES = {"pictures/samples", "pictures/samples_uniform_prior"}


def small_vq(prior=None, classes=None) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE((1, 28, 28), 4, BernoulliLikelihood(), codebook_size=8, hidden=16,
                 residual_hidden=8, residual_blocks=1, prior=prior,
                 conditional_prior=classes is not None, num_classes=classes)


@pytest.mark.parametrize("shape, grid", [((1, 28, 28), (7, 7)), ((3, 32, 32), (8, 8)),
                                         ((3, 64, 64), (8, 8)), ((3, 128, 128), (8, 8)),
                                         ((1, 30, 30), (7, 7))])
def test_the_conv_stack_retraces_every_image_size(shape, grid):
    vae = VQVAE(shape, 4, BernoulliLikelihood(), codebook_size=8, hidden=8, residual_hidden=4,
                residual_blocks=1)
    x = torch.rand(2, *shape).round()
    q = vae.encode(x)
    assert vae.grid_shape == grid and q.codes.shape == (2, *grid)
    assert vae.decode(q.mean).log_prob(x).shape == (2,)


def test_pixelcnn_sees_only_the_cells_before_each_cell():
    torch.manual_seed(0)
    net = GatedPixelCNN(codebook_size=5, channels=8, layers=4, kernel=3, num_classes=3)
    codes, label = torch.randint(5, (1, 5, 6)), torch.tensor([1])
    base = net(codes, label)
    for i, j in [(0, 0), (2, 3), (4, 5), (1, 0)]:
        changed = codes.clone()
        changed[0, i, j] = (changed[0, i, j] + 1) % 5
        moved = (net(changed, label) - base).abs().amax(1)[0] > 1e-6  # [h, w]
        position = torch.arange(30).reshape(5, 6)
        assert not moved[position <= i * 6 + j].any(), (i, j)  # the cell itself and before
        if (i, j) == (2, 3):  # the cell right after it, and the one below, do see it
            assert moved[2, 4] and moved[3, 3]
    assert (net(codes, torch.tensor([2])) - base).abs().max() > 1e-6  # the label counts
    # no row below a cell reaches it, so sampling may run the net on the rows above only
    assert torch.allclose(net(codes[:, :3], label), base[:, :, :3], atol=1e-6)


def test_vq_posterior_is_a_point_mass_and_its_kl_is_minus_log_prior():
    vae = small_vq()
    x = torch.rand(6, 1, 28, 28).round()
    vae.encode(x)  # training mode: the codebook starts from k-means of these outputs
    q = vae.eval().encode(x)
    z = q.rsample((3,))
    assert torch.equal(z[0], z[2]) and torch.equal(z[0], q.mean)
    assert torch.equal(vae.codes_of(q.mean), q.codes)  # draws are codebook vectors
    assert torch.allclose(vae.vectors_of(q.codes), q.mean.detach(), atol=1e-6)
    assert torch.equal(q.log_prob(z), torch.zeros(3, 6))
    assert q.log_prob(z + 1).eq(-math.inf).all()
    cells = math.prod(vae.grid_shape)
    assert vae.grid_shape == (7, 7)
    assert torch.allclose(vae.kl(q, z), torch.full((3, 6), cells * math.log(8)))
    out = ELBO(beta=1.0)(vae.train(), x)
    assert out["commitment"] > 0
    parts = out["recon"] + out["kl"] + out["commitment"]
    assert out["loss"].item() == pytest.approx(parts.item())
    out["loss"].backward()  # straight-through: the decoder's gradient reaches the encoder
    assert vae.encoder[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_dead_codes_restart_only_when_asked(threshold):
    """Codes that start far from every encoder output are never chosen; restarts (a positive
    model.dead_code_threshold) move them onto encoder outputs, so more codes come into use."""
    torch.manual_seed(0)
    vae = VQVAE((1, 28, 28), 4, BernoulliLikelihood(), codebook_size=32, hidden=16,
                residual_hidden=8, residual_blocks=1, kmeans_init=False,
                dead_code_threshold=threshold)
    with torch.no_grad():
        vae.quantizer._codebook.embed.mul_(0).add_(100.0)  # all codes far away ...
        vae.quantizer._codebook.embed[0, 0] = 0.0          # ... but one
    x = torch.rand(32, 1, 28, 28)
    for _ in range(5):
        vae.encode(x)
    used = vae.eval().encode(x).codes.unique().numel()
    assert (used > 4) == (threshold > 0), used


def test_evaluation_of_a_point_mass_takes_one_draw_and_is_the_bound():
    vae = small_vq(partial(PixelCNNPrior, channels=8, layers=2), classes=10).eval()
    x, y = torch.rand(5, 1, 28, 28).round(), torch.arange(5)
    scores = evaluation.score(vae, [(x, y)], samples=50)
    assert scores.samples == 1
    assert torch.allclose(scores.nll, scores.nelbo)
    q = vae.encode(x)
    bound = vae.decode(q.mean).log_prob(x) + vae.prior_net.log_prob_codes(q.codes, y)
    assert torch.allclose(-scores.nll, bound, atol=1e-3)
    samples = vae.sample(4, torch.tensor([0, 1, 2, 3]))
    assert samples.shape == (4, 1, 28, 28)
    with pytest.raises(BadValue, match="label"):
        vae.sample(2)


def events(run):
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0,
                                                                          "histograms": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory, data_dir):
    """A tiny model=vqvae run, shared by the stage-two tests."""
    from tests.conftest import TINY
    from vaelab.cli import config_dir

    run = tmp_path_factory.mktemp("vq_one")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={data_dir}", *TINY, CPU, *SMALL_VQ,
                                          "trainer.max_epochs=2", "data=fashion_mnist"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(run)
    HydraConfig().set_config(cfg)
    metrics = train(cfg)
    save_run_config(cfg, run)
    GlobalHydra.instance().clear()
    return run, metrics


def test_stage_one_logs_the_codebook(stage_one):
    run, metrics = stage_one
    assert metrics["test/kl"] == pytest.approx(49 * math.log(16), rel=1e-5)  # uniform prior
    assert metrics["test/nelbo"] == pytest.approx(metrics["test/recon"] + metrics["test/kl"])
    assert "test/commitment" in metrics
    found = events(run)
    assert {"codebook/perplexity", "codebook/codes_in_use"} <= set(found.Tags()["scalars"])
    in_use = found.Scalars("codebook/codes_in_use")[-1].value
    assert 1 <= in_use <= 16
    assert 1 <= found.Scalars("codebook/perplexity")[-1].value <= in_use + 1e-6
    assert "codebook/usage" in found.Tags()["histograms"]
    assert "pictures/code_grids" in found.Tags()["images"]


def test_stage_two_learns_a_prior_on_cached_codes_and_resumes(stage_one, compose_train,
                                                              tmp_path):
    run, first = stage_one
    common = [CPU, *SMALL_PRIOR, f"vqvae_run={run}", "lr=3e-3"]
    full = tmp_path / "full"
    (full / ".hydra").mkdir(parents=True)  # as Hydra makes it; stage two rewrites its config
    done = train(compose_train(*common, "trainer.max_epochs=3", output_dir=full))
    # the prior learned something: the codes cost less than under the uniform prior
    assert done["test/kl"] < first["test/kl"] - 1
    assert done["test/recon"] == pytest.approx(first["test/recon"], rel=1e-4)  # frozen
    assert done["test/nelbo"] == pytest.approx(done["test/recon"] + done["test/kl"], rel=1e-5)
    assert (full / "codes.pt").is_file()
    saved = OmegaConf.load(full / ".hydra" / "config.yaml")
    assert saved.model._target_ == "vaelab.models.VQVAE"
    assert saved.model.prior._target_ == "vaelab.models.PixelCNNPrior"
    assert saved.model.conditional_prior  # Fashion-MNIST's labels: auto -> conditional
    assert STAGE_TWO_PICTURES <= set(events(full).Tags()["images"])

    part = tmp_path / "part"
    train(compose_train(*common, "trainer.max_epochs=2", output_dir=part))
    resumed = train(compose_train(*common, "trainer.max_epochs=3", f"resume={part}",
                                  output_dir=part))
    for key in ("test/nelbo", "test/kl", "val/loss", "train/loss"):
        assert resumed[key] == pytest.approx(done[key], rel=1e-5), key

    results = evaluate(compose_tool("eval", f"run_dir={full}", "nll_samples=20"))
    assert results["eval/nll_samples"] == 1
    assert results["eval/nll"] == pytest.approx(results["eval/nelbo"])
    assert results["eval/nelbo"] == pytest.approx(done["test/nelbo"], rel=1e-4)
    written = generate(compose_tool("generate", f"run_dir={full}",
                                    "pictures=[samples,uniform_samples,code_grids]"))
    assert set(written) == {"samples", "uniform_samples", "code_grids"}


def test_stage_two_refuses_what_is_not_a_vq_vae(stage_one, compose_train, tmp_path):
    mlp = tmp_path / "mlp"
    cfg = compose_train(CPU, "trainer.max_epochs=1", output_dir=mlp)
    train(cfg)
    save_run_config(cfg, mlp)
    with pytest.raises(BadValue, match="not a VQ-VAE"):
        train(compose_train(CPU, *SMALL_PRIOR, f"vqvae_run={mlp}", output_dir=tmp_path / "a"))
    with pytest.raises(MissingFile, match="does not exist"):
        train(compose_train(CPU, *SMALL_PRIOR, f"vqvae_run={tmp_path / 'nowhere'}",
                            output_dir=tmp_path / "b"))
    run, _ = stage_one
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "checkpoints").mkdir()
    (evil / "checkpoints" / "last.ckpt").write_bytes(
        (run / "checkpoints" / "last.ckpt").read_bytes())
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    config.data._target_ = "os.system"
    (evil / ".hydra").mkdir()
    OmegaConf.save(config, evil / ".hydra" / "config.yaml")
    with pytest.raises(UnsafeSpecError, match="os.system"):
        train(compose_train(CPU, *SMALL_PRIOR, f"vqvae_run={evil}", output_dir=tmp_path / "c"))
    with pytest.raises(BadValue, match="discrete codes"):
        generate(compose_tool("generate", f"run_dir={mlp}", "pictures=[uniform_samples]"))


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception: FID's plumbing without the 100 MB of weights."""

    num_features = 4

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return pooled[:, :4]


def test_fid_and_kid_compare_samples_with_images():
    vae = small_vq().eval()
    torch.manual_seed(0)
    images = torch.rand(40, 1, 28, 28)
    batches = [(images[i:i + 10], torch.zeros(10)) for i in range(0, 40, 10)]
    found = fid_kid(vae, batches, 30, feature=TinyFeatures())
    assert found["eval/fid_images"] == 30 and found["eval/fid"] > 0
    assert math.isfinite(found["eval/kid"])
    # metrics built before (eval checks the weights first): the same numbers, from those objects
    built = inception_metrics(2, TinyFeatures())
    again = fid_kid(vae, batches, 30, metrics=built)
    assert again["eval/fid"] == pytest.approx(found["eval/fid"])
    assert built[0].real_features_num_samples == 30 and built[1].subset_size == 30


def test_fid_without_weights_names_the_file_and_where_it_goes(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MissingFile, match="weights-inception-2015-12-05-6726825d.pth") as err:
        inception_metrics(10)
    assert str(tmp_path) in str(err.value)
