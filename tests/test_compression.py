"""Bits-back coding: exact round trips for every discrete likelihood, a rate that is the negative
ELBO, refusals of what cannot be coded, and the file through vaelab-compress and
vaelab-decompress, hostile copies included."""

import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import compose_tool
from tests.test_denoising import run_dir
from vaelab.compression.bitsback import BitsBack, Coded, seeded_words
from vaelab.errors import BadValue
from vaelab.likelihoods import BernoulliLikelihood, GaussianLikelihood, LogisticMixtureLikelihood
from vaelab.models import MLPVAE, ConvVAE, HierarchicalVAE, VampPrior
from vaelab.training import train


def bars(n: int, seed: int = 0) -> torch.Tensor:
    """Binary 8x8 images of one horizontal and one vertical bar, as 8-bit 0/255."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    for i, (r, c) in enumerate(rng.integers(0, 8, (n, 2))):
        images[i, 0, r, :] = images[i, 0, :, c] = 255
    return torch.from_numpy(images)


def models():
    torch.manual_seed(0)
    return {
        "bernoulli": MLPVAE((1, 8, 8), 4, BernoulliLikelihood(), hidden_dims=[32]),
        "dlogistic": ConvVAE((3, 8, 8), 2, LogisticMixtureLikelihood(3), channels=[8],
                             latent_map=4),
        "dlogistic, local window": ConvVAE((3, 8, 8), 2, LogisticMixtureLikelihood(
            3, context=3, hidden=8), channels=[8], latent_map=4),
        "discretized gaussian": MLPVAE((1, 6, 6), 3, GaussianLikelihood(
            scale="pixel", discretized=True), hidden_dims=[16]),
        "cvae": MLPVAE((1, 8, 8), 4, BernoulliLikelihood(), hidden_dims=[32], conditional=True,
                       num_classes=3),
    }


@pytest.mark.parametrize("name", list(models()))
def test_every_discrete_likelihood_gives_the_images_back(name):
    vae = models()[name].eval()
    generator = torch.Generator().manual_seed(1)
    if isinstance(vae.likelihood, BernoulliLikelihood):
        images = bars(41)
    else:
        images = torch.randint(0, 256, (41, *vae.data_shape), generator=generator,
                               dtype=torch.uint8)
    labels = torch.randint(0, 3, (41,), generator=generator) if vae.conditional else None
    codec = BitsBack(vae, precision=10, chunk=8)
    coded = codec.encode(images, labels)
    assert coded.sizes[0] == 1 and max(coded.sizes) <= 8 and sum(coded.sizes) == 41
    back, back_labels = codec.decode(coded, vae.data_shape, vae.conditional)
    assert back.dtype == torch.uint8 and torch.equal(back, images)
    assert labels is None or torch.equal(back_labels, labels)
    # the seeded words that coding left untouched are drawn again, not stored; a stack that
    # stores them all (format 1) decodes the same
    assert 0 < coded.shared < coded.initial
    whole = Coded(np.concatenate([seeded_words(coded.seed, coded.initial)[:coded.shared],
                                  coded.words]), coded.sizes, coded.initial, coded.seed)
    assert torch.equal(codec.decode(whole, vae.data_shape, vae.conditional)[0], images)


@pytest.fixture(scope="module")
def trained_bars():
    """A small Bernoulli VAE fitted to the bar images: its latents carry information."""
    torch.manual_seed(0)
    vae = MLPVAE((1, 8, 8), 4, BernoulliLikelihood(), hidden_dims=[64])
    x = bars(512).float() / 255
    optimizer = torch.optim.Adam(vae.parameters(), 3e-3)
    for _ in range(400):
        q = vae.encode(x)
        loss = -(vae.decode(q.rsample()).log_prob(x) - vae.kl(q, q.mean)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vae.eval()


def test_the_rate_is_the_negative_elbo_in_bits(trained_bars):
    vae, images = trained_bars, bars(1000, seed=1)
    x = images.float() / 255
    with torch.no_grad():
        q = vae.encode(x)
        kl = vae.kl(q, q.mean)
        recon = torch.stack([vae.decode(q.sample()).log_prob(x) for _ in range(200)]).mean(0)
    nelbo_bits = ((kl - recon).sum() / math.log(2)).item()
    assert kl.mean() > 3  # the latents are used: bits-back has something to give back
    coded = BitsBack(vae, precision=14).encode(images)
    rate_bits = 32 * (len(coded.words) - coded.borrowed)
    assert rate_bits == pytest.approx(nelbo_bits, rel=0.015)


def test_what_cannot_be_coded_is_refused(trained_bars):
    with pytest.raises(BadValue, match="likelihood=dlogistic or likelihood=gaussian"):
        BitsBack(MLPVAE((1, 8, 8), 4, GaussianLikelihood()))
    with pytest.raises(BadValue, match="2 stochastic layers"):
        BitsBack(HierarchicalVAE((1, 8, 8), 4, BernoulliLikelihood(), bottom_dim=4,
                                 hidden_dims=[16]))
    vamp = MLPVAE((1, 8, 8), 4, BernoulliLikelihood(), hidden_dims=[16],
                  prior=lambda **shapes: VampPrior(components=5, **shapes)).eval()
    with pytest.raises(BadValue, match="not a diagonal Gaussian"):
        BitsBack(vamp).encode(bars(3))
    grey = bars(3)
    grey[0, 0, 0, 0] = 128
    with pytest.raises(BadValue, match="codes binary images"):
        BitsBack(trained_bars).encode(grey)
    with pytest.raises(BadValue, match="conditional"):
        BitsBack(models()["cvae"].eval()).encode(bars(3))


def test_compress_and_decompress_through_the_commands(compose_train, tmp_path):
    from vaelab import runs
    from vaelab.cli.compress import compress
    from vaelab.cli.decompress import decompress

    trained = {}
    for name, extra in (("binary", ["data.binarize=dynamic"]), ("other", ["seed=7"]),
                        ("gaussian", ["likelihood=gaussian"])):
        path = tmp_path / name
        cfg = compose_train("trainer.max_epochs=1", "model.hidden_dims=[32]", "latent_dim=4",
                            *extra, output_dir=path)
        train(cfg)
        run_dir(cfg, path)
        trained[name] = path
    file = tmp_path / "test.vbb"
    stats = compress(compose_tool("compress", f"run_dir={trained['binary']}",
                                  "input=mnist:test", f"out={file}"))
    assert stats["verified"] and stats["bytes"] == file.stat().st_size
    assert stats["bits_per_dim"] == pytest.approx(8 * file.stat().st_size / (32 * 784))
    assert (tmp_path / "test.vbb.json").is_file()

    # positional file argument, a real process: the split's static binarization, as IDX
    out = tmp_path / "back"
    done = subprocess.run([sys.executable, "-m", "vaelab.cli.decompress", str(file),
                           f"out={out}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = (out / "t10k-images-idx3-ubyte").read_bytes()
    assert struct.unpack(">4B3I", data[:16]) == (0, 0, 8, 3, 32, 28, 28)
    test_set = runs.load_split(runs.run_config(trained["binary"]), "test")
    assert np.array_equal(np.frombuffer(data[16:], np.uint8), test_set.images.numpy().ravel())

    # hostile copies: truncated, one flipped byte, another model, a continuous likelihood
    raw = file.read_bytes()
    for name, damaged in (("cut", raw[:-40]), ("flip", raw[:200] + bytes([raw[200] ^ 1])
                                               + raw[201:])):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(BadValue, match="is damaged"):
            decompress(compose_tool("decompress", f"file={tmp_path / name}",
                                    f"out={tmp_path / 'none'}"))
    with pytest.raises(BadValue, match="compressed with another model"):
        decompress(compose_tool("decompress", f"file={file}", f"run_dir={trained['other']}",
                                f"out={tmp_path / 'none'}"))
    assert not (tmp_path / "none").exists()
    with pytest.raises(BadValue, match="is a density over continuous values"):
        compress(compose_tool("compress", f"run_dir={trained['gaussian']}", "input=mnist:test",
                              f"out={tmp_path / 'g.vbb'}"))

    # a folder of binary PNGs comes back as the same PNGs
    folder = tmp_path / "pngs"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(test_set.images[:5, 0].numpy()):
        Image.fromarray(image).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    compress(compose_tool("compress", f"run_dir={trained['binary']}", f"input={folder}",
                          f"out={tmp_path / 'folder.vbb'}", "verify=false"))
    decompress(compose_tool("decompress", f"file={tmp_path / 'folder.vbb'}"))
    for source in folder.rglob("*.png"):
        back = tmp_path / "folder" / source.relative_to(folder)
        assert np.array_equal(np.asarray(Image.open(back)), np.asarray(Image.open(source)))
    # and with the first image stored as WebP
    stats = compress(compose_tool("compress", f"run_dir={trained['binary']}", f"input={folder}",
                                  f"out={tmp_path / 'lead.vbb'}", "lead=true"))
    assert stats["verified"] and len(stats["lead_webp_bits"]) >= 1
    decompress(compose_tool("decompress", f"file={tmp_path / 'lead.vbb'}"))
    for source in folder.rglob("*.png"):
        back = tmp_path / "lead" / source.relative_to(folder)
        assert np.array_equal(np.asarray(Image.open(back)), np.asarray(Image.open(source)))


@pytest.mark.parametrize("name", ["dlogistic", "cvae"])
def test_a_first_image_that_webp_codes_cheaper_is_stored_as_webp(name):
    """A flat first image costs an untrained model far more than WebP: `lead=None` stores it as
    WebP, and the file is smaller than with its latents drawn from borrowed words."""
    vae = models()[name].eval()
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (9, *vae.data_shape), generator=generator, dtype=torch.uint8)
    images[0] = 255
    if isinstance(vae.likelihood, BernoulliLikelihood):
        images = bars(9)
        images[0] = 255
    labels = torch.randint(0, 3, (9,), generator=generator) if vae.conditional else None
    codec = BitsBack(vae, precision=10, chunk=4)
    auto, never = codec.encode(images, labels), codec.encode(images, labels, lead=False)
    assert never.lead_bytes == [] and sum(never.sizes) == 9
    if name == "cvae":  # 64 binary pixels: WebP's own framing costs more than it saves
        assert auto.lead_bytes == []
        auto = codec.encode(images, labels, lead=True)
    else:
        assert len(auto.words) < len(never.words)
    lead = len(auto.lead_bytes)
    assert lead >= 1 and sum(auto.sizes) == 9 - lead
    back, back_labels = codec.decode(auto, vae.data_shape, vae.conditional)
    assert torch.equal(back, images)
    assert labels is None or torch.equal(back_labels, labels)
    assert auto.lead_labels == (None if labels is None else labels[:lead].tolist())
    one = codec.encode(images[:1], None if labels is None else labels[:1], lead=True)
    assert one.sizes == [] and one.initial == 0
    assert torch.equal(codec.decode(one, vae.data_shape, vae.conditional)[0], images[:1])


def test_a_header_that_coding_cannot_have_written_is_refused(tmp_path):
    """A file whose checksum was made to match a header with impossible counts: one message."""
    from vaelab.compression import container

    words = np.arange(5, dtype=np.uint32)
    good = Coded(words, [1, 2], 4, 0, 3)
    (tmp_path / "good.vbb").write_bytes(container.pack({"count": 3}, good))
    header, back = container.unpack(tmp_path / "good.vbb")
    assert (back.sizes, back.initial, back.shared) == ([1, 2], 4, 3)
    assert np.array_equal(back.words, words) and header["format"] == container.FORMAT
    # format 2 wrote its header as plain JSON, with no first images as WebP
    import hashlib
    import json

    text = json.dumps({"count": 3, "format": 2, "sizes": [1, 2], "initial_words": 4,
                       "shared_words": 3, "seed": 0}).encode()
    body = container.MAGIC + struct.pack("<I", len(text)) + text + words.astype("<u4").tobytes()
    (tmp_path / "old.vbb").write_bytes(body + hashlib.sha256(body).digest())
    header, back = container.unpack(tmp_path / "old.vbb")
    assert header["format"] == 2 and (back.sizes, back.shared, back.lead_bytes) == ([1, 2], 3, [])
    lead = Coded(words, [2], 4, 0, 3, lead_bytes=[9], lead_labels=[2])
    (tmp_path / "lead.vbb").write_bytes(container.pack({"count": 3}, lead))
    back = container.unpack(tmp_path / "lead.vbb")[1]
    assert (back.lead_bytes, back.lead_labels) == ([9], [2])
    for bad in (Coded(words, [1, 2], 4, 0, 5), Coded(words, [1, 2], 4, 0, -1),
                Coded(words, [0, 2], 4, 0, 3), Coded(words, [], 4, 0, 3),
                Coded(words, [2], 4, 0, 3, [21]), Coded(words, [2], 4, 0, 3, [0]),
                Coded(words, [2], 4, 0, 3, [4], [1, 2])):
        (tmp_path / "bad.vbb").write_bytes(container.pack({"count": 3}, bad))
        with pytest.raises(BadValue, match="cannot come from vaelab-compress"):
            container.unpack(tmp_path / "bad.vbb")
