"""The denoising VAE: corruption processes, what the encoder sees against what the likelihood
scores, seeded evaluation noise, and denoising through train, eval and generate."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import compose_tool
from vaelab.data.corruption import Corruption
from vaelab.data.tensor_images import TensorImages
from vaelab.errors import BadValue
from vaelab.likelihoods import BernoulliLikelihood
from vaelab.models import MLPVAE
from vaelab.objectives import ELBO, IWAE
from vaelab.training import train

IMAGES = (torch.arange(200 * 64) % 251).reshape(200, 1, 8, 8).to(torch.uint8)


@pytest.mark.parametrize("kind, strength", [("gaussian", 0.2), ("saltpepper", 0.3),
                                            ("mask", 0.4)])
def test_each_corruption_does_what_it_says(kind, strength):
    x = torch.full((400, 3, 16, 16), 0.5)
    seen = Corruption(kind, strength)(x, torch.Generator().manual_seed(0))
    assert seen.shape == x.shape and 0 <= seen.min() and seen.max() <= 1
    if kind == "gaussian":  # 0.5 +- 0.2: clipping at 0 and 1 is rare
        assert (seen - x).std().item() == pytest.approx(strength, rel=0.03)
    elif kind == "saltpepper":  # values hit, half to 0, half to 1
        hit = seen != 0.5
        assert hit.float().mean().item() == pytest.approx(strength, abs=0.01)
        assert (seen[hit] == 1).float().mean().item() == pytest.approx(0.5, abs=0.02)
    else:  # whole pixels: every channel of a masked pixel is 0
        masked = (seen == 0).all(1)
        assert masked.float().mean().item() == pytest.approx(strength, abs=0.01)
        assert torch.equal((seen == 0).any(1), masked)


def test_training_noise_is_fresh_and_evaluation_noise_is_fixed_by_the_seed():
    noise = Corruption("gaussian", 0.3)
    train_set = TensorImages(IMAGES, torch.zeros(200), corruption=noise)
    x, _, first = train_set.__getitems__(list(range(10)))
    _, _, second = train_set.__getitems__(list(range(10)))
    assert torch.equal(x, IMAGES[:10].float() / 255) and not torch.equal(first, second)
    fixed = [TensorImages(IMAGES, torch.zeros(200), seed=s, corruption=noise, fresh_noise=False)
             for s in (1, 1, 2)]
    seen = [f.__getitems__([3, 4])[2] for f in fixed]
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    assert torch.equal(seen[0], (seen[0] * 255).round() / 255)  # 8-bit images too
    rows = TensorImages(IMAGES, torch.zeros(200), seed=1, rows=torch.arange(100, 200),
                        corruption=noise, fresh_noise=False)  # a memory-mapped split's rows
    x_rows, _, seen_rows = rows.__getitems__([0, 1])
    assert torch.equal(x_rows, IMAGES[100:102].float() / 255)
    assert (seen_rows - x_rows).abs().max() < 1.5  # noise around those very rows


@pytest.mark.parametrize("kind, strength", [("blur", 0.2), ("gaussian", 0.0),
                                            ("mask", 1.0)])
def test_a_bad_corruption_is_named(kind, strength):
    with pytest.raises(BadValue, match="data.corruption"):
        Corruption(kind, strength)


@pytest.mark.parametrize("objective", [ELBO(mc_samples=2), IWAE(mc_samples=3)])
def test_the_encoder_sees_the_inputs_and_the_likelihood_scores_the_clean_image(objective):
    torch.manual_seed(0)
    vae = MLPVAE((1, 8, 8), 3, BernoulliLikelihood(), hidden_dims=[16])
    x = IMAGES[:6].float() / 255
    noisy = Corruption("saltpepper", 0.3)(x, torch.Generator().manual_seed(1))
    seen, encode = [], vae.encode

    def recording(images, context=None):
        seen.append(images)
        return encode(images, context)

    vae.encode = recording
    torch.manual_seed(2)
    out = objective(vae, x, inputs=noisy)
    assert seen == [noisy]
    vae.encode = encode
    torch.manual_seed(2)  # the same draws from the same q(z | noisy): recon of x, not of noisy
    q = vae.encode(noisy)
    z = q.rsample((objective.mc_samples,))
    assert out["recon"].item() == pytest.approx(-vae.decode(z).log_prob(x).mean().item(),
                                                rel=1e-5)
    assert out["recon"].item() != pytest.approx(-vae.decode(z).log_prob(noisy).mean().item(),
                                                rel=1e-3)


def run_dir(cfg, path):
    """A trained run's .hydra/config.yaml, as train.py leaves it."""
    (path / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                   path / ".hydra" / "config.yaml", resolve=True)


def test_a_dvae_and_a_plain_vae_are_scored_on_the_same_noisy_test_images(compose_train,
                                                                          tmp_path):
    from vaelab.cli.eval import evaluate
    from vaelab.cli.generate import generate

    dvae, plain = tmp_path / "dvae", tmp_path / "plain"
    for path, extra in ((dvae, ["data.corruption=gaussian", "data.corruption_strength=0.3"]),
                        (plain, [])):
        cfg = compose_train("trainer.max_epochs=2", "model.hidden_dims=[32]", *extra,
                            output_dir=path)
        metrics = train(cfg)
        assert np.isfinite(metrics["test/nelbo"])
        run_dir(cfg, path)
    noise = ["corruption.kind=gaussian", "corruption.strength=0.3"]
    results = {}
    for name, path, extra in (("dvae", dvae, []), ("plain", plain, noise), ("clean", plain, [])):
        results[name] = evaluate(compose_tool("eval", f"run_dir={path}", "nll_samples=5",
                                              *extra, f"out_dir={tmp_path / name}"))
    assert results["dvae"]["eval/psnr_input"] == pytest.approx(
        results["plain"]["eval/psnr_input"], abs=1e-9)  # the very same noisy images
    assert 5 < results["dvae"]["eval/psnr_input"] < 20  # std 0.3 noise: about 11 dB
    assert "eval/psnr_input" not in results["clean"] and results["clean"]["eval/psnr"] > 0
    assert json.loads(next((tmp_path / "dvae").glob("eval*.json")).read_text())["eval/psnr"] > 0

    written = generate(compose_tool("generate", f"run_dir={dvae}", "pictures=[denoising]",
                                    "denoising.n=8", f"out_dir={tmp_path / 'pictures'}"))
    rows = np.asarray(Image.open(written["denoising"]).convert("L"), dtype=float)
    assert rows.shape == (3 * 30 + 2, 8 * 30 + 2)  # noisy, denoised, clean rows of 8 (28 px)
    noisy_row, clean_row = rows[2:30, 2:-2], rows[62:90, 2:-2]
    assert np.abs(np.diff(noisy_row, axis=1)).mean() > 2 * np.abs(np.diff(clean_row, axis=1)).mean()
    with pytest.raises(BadValue, match="needs corrupted images"):
        generate(compose_tool("generate", f"run_dir={plain}", "pictures=[denoising]",
                              f"out_dir={tmp_path / 'none'}"))
    generate(compose_tool("generate", f"run_dir={plain}", "pictures=[denoising]", *[
        f"denoising.{n}" for n in noise], f"out_dir={tmp_path / 'plain-pictures'}"))
    assert (tmp_path / "plain-pictures" / "denoising.png").is_file()
