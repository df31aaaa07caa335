"""Pictures: their geometry on hand-built models, TensorBoard summaries and generated PNGs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from tests.conftest import ROOT, compose_tool
from vaelab import pictures
from vaelab.likelihoods import GaussianLikelihood
from vaelab.models.vae import VAE
from vaelab.training import train

TAGS = ["pictures/reconstructions", "pictures/samples", "pictures/manifold",
        "pictures/latent_scatter", "pictures/interpolations", "pictures/traversals"]


def linear_vae(latent_dim=4, data_dim=6, active=(1, 3)) -> VAE:
    """Encoder: z_u = x_u for the `active` units, 0 for the rest (collapsed).
    Decoder: pixel 0 = (1 + z_0) / 2, pixel 1 = (1 + z_1) / 2, other pixels 0."""
    encoder, decoder = nn.Linear(data_dim, 2 * latent_dim), nn.Linear(latent_dim, data_dim)
    with torch.no_grad():
        encoder.weight.zero_(), encoder.bias.zero_(), decoder.weight.zero_(), decoder.bias.zero_()
        for u in active:
            encoder.weight[u, u] = 1.0
        decoder.weight[0, 0] = decoder.weight[1, 1] = 0.5
        decoder.bias[:2] = 0.5
    lik = GaussianLikelihood(scale=0.1, learn_scale=False)
    return VAE(nn.Sequential(nn.Flatten(), encoder), decoder, lik, latent_dim, (1, 1, data_dim))


def test_manifold_walks_the_grid_with_y_up():
    vae = linear_vae()
    axis = torch.linspace(-1, 1, 5)
    images = pictures.manifold_images(vae, axis, axis, dims=(0, 1)).flatten(1)
    assert images.shape == (25, 6)
    top_left, bottom_right = images[0], images[-1]
    assert top_left[:2].tolist() == [0.0, 1.0]     # z0 = -1 (left), z1 = +1 (top)
    assert bottom_right[:2].tolist() == [1.0, 0.0]  # z0 = +1 (right), z1 = -1 (bottom)
    assert images[12][:2].tolist() == [0.5, 0.5]    # the centre is z = 0


def test_manifold_is_framed_by_the_prior_quantiles_or_the_posterior_range():
    from torch.distributions import Normal

    vae = linear_vae()
    columns, rows, base = pictures.manifold_axes(vae, (1, 3), n=5)
    expected = Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 5))  # +-1.645: K&W's figure
    torch.testing.assert_close(columns, expected)
    torch.testing.assert_close(rows, expected)
    assert base.tolist() == [0.0] * 4
    x = torch.zeros(101, 1, 1, 6)
    x[:, 0, 0, 1] = torch.linspace(10, 20, 101)  # unit 1's posterior mean is x_1
    means = pictures.encode_means(vae, x)
    columns, rows, base = pictures.manifold_axes(vae, (1, 3), n=3, frame="posterior", means=means)
    torch.testing.assert_close(columns, torch.tensor([10.5, 15.0, 19.5]))
    assert rows.tolist() == [0.0] * 3 and base[1].item() == pytest.approx(15.0)
    figure = pictures.manifold_figure(pictures.manifold_images(vae, columns, rows, (1, 3), base),
                                      columns, rows, (1, 3))
    ax = figure.axes[0]
    assert ax.get_xlabel() == "z[1]" and ax.get_xticklabels()[0].get_text() == "10.50"


def test_scatter_axes_are_labelled():
    vae = linear_vae()
    figure = pictures.latent_scatter(vae, torch.randn(20, 4), torch.arange(20) % 3)
    assert (figure.axes[0].get_xlabel(), figure.axes[0].get_ylabel()) == ("PC 1", "PC 2")


def test_most_active_dims_skip_collapsed_units():
    vae = linear_vae(active=(1, 3))
    means = pictures.encode_means(vae, torch.randn(200, 1, 1, 6))
    assert pictures.most_active_dims(means) == [1, 3]
    assert pictures.manifold_dims(vae, means) == (1, 3)


def big_image_vae(side: int = 256, latent_dim: int = 3) -> VAE:
    """A decoder of grey side x side images (and an encoder of them): big tiles for the grids."""
    pixels = side * side
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 2 * latent_dim))
    decoder = nn.Sequential(nn.Linear(latent_dim, pixels), nn.Unflatten(1, (1, side, side)))
    return VAE(encoder, decoder, GaussianLikelihood(scale=0.1, learn_scale=False), latent_dim,
               (1, side, side))


@pytest.mark.parametrize("count", [4, 64, 400])
def test_grids_never_hold_more_than_grid_pixels(count):
    """Tiles keep their size while the grid fits and shrink beyond: 400 tiles of 256 px would be
    26 M pixels, the grid stays within 2048^2."""
    vae = big_image_vae()
    limit = pictures.GRID_PIXELS * 1.05  # + padding
    side = pictures.tile_size(count, vae.data_shape)[0]
    assert side == min(256, int(256 * (pictures.GRID_PIXELS / (count * 256 ** 2)) ** 0.5))
    samples = pictures.sample_grid(vae, count, nrow=8)
    assert samples[0].numel() <= limit
    x = torch.rand(max(2, count // 4), 1, 256, 256)
    assert pictures.reconstruction_grid(vae, x)[0].numel() <= limit
    n = int(count ** 0.5)
    axis = torch.linspace(-1, 1, n)
    tiles = pictures.manifold_images(vae, axis, axis, (0, 1))
    assert tiles.shape == (n * n, 1, *pictures.tile_size(n * n, vae.data_shape))
    interpolation = pictures.interpolation_grid(vae, x[0::2], x[1::2], steps=9)
    assert interpolation[0].numel() <= limit


def test_encode_stream_reads_only_what_it_keeps():
    vae = linear_vae()
    served = []

    def batches():
        for i in range(100):  # far more than asked for
            served.append(i)
            yield torch.full((10, 1, 1, 6), float(i)), torch.full((10,), i)

    means, labels, thumbs = pictures.encode_stream(vae, batches(), 25, thumbnails=True)
    assert served == [0, 1, 2]  # 25 images: two whole batches and half of the third
    assert means.shape == (25, 4) and labels.tolist() == [0] * 10 + [1] * 10 + [2] * 5
    assert means[:, 1].tolist() == labels.float().tolist()  # unit 1's mean is x_1
    assert thumbs.shape == (25, 1, 1, 6)
    with pytest.raises(ValueError, match="empty"):
        pictures.encode_stream(vae, iter([]), 5)


def test_pca_keeps_the_direction_of_largest_variance():
    t = torch.linspace(-3, 3, 100)[:, None]
    direction = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5]])
    points = t * direction + 0.01 * torch.randn(100, 5) + 7
    projected = pictures.project_2d(points)
    assert projected.shape == (100, 2)
    assert projected[:, 0].var() > 1000 * projected[:, 1].var()
    assert projected.mean(0).abs().max() < 1e-4  # centred
    with pytest.raises(ValueError, match="umap"):
        pictures.project_2d(points, "umap")


def test_interpolation_rows_run_from_a_to_b_through_the_midpoint():
    vae = linear_vae(latent_dim=2, active=(0, 1))
    a, b = torch.full((1, 1, 1, 6), -0.8), torch.full((1, 1, 1, 6), 0.6)
    grid = pictures.interpolation_grid(vae, a, b, steps=5)  # a, 5 decodings, b
    cells = grid[0, 2:3].reshape(-1)  # the 1-pixel-high row of the grid
    assert grid.shape[-1] == 7 * (6 + 2) + 2
    first = cells[2 + 8: 2 + 8 + 2]   # decoding at t = 0: z = a's mean = -0.8
    middle = cells[2 + 3 * 8: 2 + 3 * 8 + 2]
    torch.testing.assert_close(first, torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(middle, torch.tensor([0.45, 0.45]))  # z = -0.1


def test_training_logs_every_picture_every_n_epochs(compose_train, tmp_path):
    cfg = compose_train("trainer.accelerator=cpu", "trainer.max_epochs=3", "latent_dim=2",
                        "callbacks.reconstructions.every_n_epochs=2")
    train(cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    counts = {tag: len(events.Images(tag)) for tag in events.Tags()["images"]}
    assert counts == {**dict.fromkeys(TAGS, 3), "pictures/reconstructions": 2}  # epochs 2 and 3
    recon = events.Images("pictures/reconstructions")[-1]
    assert (recon.width, recon.height) == (8 * 30 + 2, 4 * 30 + 2)  # 16 val images + 16 recons
    samples = events.Images("pictures/samples")[0]
    assert (samples.width, samples.height) == (242, 242)  # 64 samples, 8 per row
    projector = (tmp_path / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "latent_means" in projector and "sprite" in projector
    metadata = next((tmp_path / "tensorboard").glob("*/latent_means/metadata.tsv"))
    assert len(metadata.read_text().split()) == 16  # every val image, with its label


def test_a_resume_from_an_epoch_end_keeps_that_epochs_pictures(compose_train, tmp_path):
    """Pictures are logged at the step of the epoch's validation metrics, which the resumed run's
    TensorBoard purge (everything from the checkpoint's step on) leaves in place."""
    common = ["trainer.accelerator=cpu", "callbacks.embedding_projector=null"]
    train(compose_train(*common, "trainer.max_epochs=2"))
    train(compose_train(*common, "trainer.max_epochs=3", f"resume={tmp_path}"))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0,
                                                                             "scalars": 0})
    events.Reload()
    val_steps = [s.step for s in events.Scalars("val/loss")]
    assert len(val_steps) == 3 == len(set(val_steps))
    for tag in TAGS:
        assert [image.step for image in events.Images(tag)] == val_steps, tag


def test_pictures_can_be_switched_off(compose_train, tmp_path):
    off = [f"callbacks.{name}=null" for name in ("reconstructions", "prior_samples",
                                                  "latent_manifold", "latent_scatter",
                                                  "interpolations", "embedding_projector",
                                                  "traversals")]
    train(compose_train("trainer.accelerator=cpu", "trainer.max_epochs=1", *off))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["images"] == []
    assert not (tmp_path / "tensorboard" / "projector_config.pbtxt").exists()


def png_size(path):
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("latent_dim", [2, 16])
def test_generate_writes_the_documented_pngs(compose_train, tmp_path, latent_dim):
    cfg = compose_train("trainer.accelerator=cpu", "trainer.max_epochs=1",
                        f"latent_dim={latent_dim}", "model=conv")
    train(cfg)
    # generate reads the run's own config back from .hydra/config.yaml, as a train.py run leaves.
    (tmp_path / ".hydra").mkdir()
    from omegaconf import OmegaConf
    cfg_no_hydra = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(cfg_no_hydra, tmp_path / ".hydra" / "config.yaml", resolve=True)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.zeros((40, 30, 4), np.uint8)).save(a)   # RGBA, other size
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(b)
    result = subprocess.run(
        [sys.executable, "generate.py", f"run_dir={tmp_path}", "latent_scatter.n=16",
         "interpolation.indices=[[0,1],[2,3],[4,5],[6,7]]", "manifold.n=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "generated"
    assert png_size(out / "samples.png") == (242, 242)          # 64 in rows of 8
    assert png_size(out / "reconstructions.png") == (242, 242)  # 32 test images + 32 recons
    assert png_size(out / "interpolation.png") == (11 * 30 + 2, 4 * 30 + 2)
    assert png_size(out / "manifold.png") == (800, 800)
    assert png_size(out / "latent_scatter.png") == (800, 700)
    for name in ("samples", "reconstructions", "interpolation"):
        pixels = np.asarray(Image.open(out / f"{name}.png"))
        assert pixels.std() > 0  # not a blank picture

    # the same tool in-process (the command line is checked above): images read from files
    from vaelab.cli.generate import generate

    generate(compose_tool("generate", f"run_dir={tmp_path}", "pictures=[interpolation]",
                          f"interpolation.images=[{a},{b}]", f"out_dir={tmp_path / 'files'}"))
    row = np.asarray(Image.open(tmp_path / "files" / "interpolation.png").convert("L"))
    assert row.shape == (32, 11 * 30 + 2)
    assert row[2:30, 2:30].max() == 0 and row[2:30, -30:-2].min() == 255  # a black, b white


@pytest.mark.parametrize("val_size, latent_dim", [(1, 1), (3, 2), (5, 4)])
def test_pictures_on_tiny_splits_draw_what_they_can_and_never_stop_the_run(
        compose_train, tmp_path, val_size, latent_dim):
    """One or an odd few validation images, a 1-D latent: every picture is drawn or skipped with
    a warning, and the run still tests and writes metrics.json."""
    cfg = compose_train("trainer.accelerator=cpu", "trainer.max_epochs=1",
                        f"latent_dim={latent_dim}", f"data.val_size={val_size}")
    train(cfg)
    assert (tmp_path / "metrics.json").is_file()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    drawn = set(events.Tags()["images"])
    assert {"pictures/reconstructions", "pictures/samples", "pictures/manifold",
            "pictures/latent_scatter", "pictures/traversals"} <= drawn
    assert ("pictures/interpolations" in drawn) == (val_size >= 2)  # a pair needs two images


def test_traversals_sweep_one_dim_per_row_ordered_by_kl():
    """linear_vae: units 1 and 3 are active (their KL is large), 0 and 2 collapsed (KL 0.5 log
    terms only); pixel d of the decoding is (1 + z_d) / 2 for d = 0, 1."""
    torch.manual_seed(0)
    vae = linear_vae(active=(1, 3))
    x = torch.randn(200, 1, 1, 6) * 2
    order, values, word = pictures.dimension_order(vae, [(x, None)])
    assert word == "KL" and set(order[:2]) == {1, 3} and values[1] > values[0]
    reference = torch.zeros(1, 1, 6)
    reference[0, 0, 1] = 0.4  # unit 1's mean is x_1 = 0.4
    images = pictures.traversal_images(vae, reference, [1, 0], steps=5, span=1.0).flatten(2)
    assert images.shape == (2, 5, 6)
    torch.testing.assert_close(images[0, :, 1], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(images[0, :, 0], torch.full((5,), 0.5))  # z0 held at its mean 0
    torch.testing.assert_close(images[1, :, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(images[1, :, 1], torch.full((5,), 0.7))  # z1 held at 0.4
    figure = pictures.traversal_figure(images.view(2, 5, 1, 1, 6), [1, 0], values, word, 1.0)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels[0] == f"z[1] KL {values[1]:.2f}" and labels[1].startswith("z[0] KL")
    frames = pictures.traversal_frames(images.view(2, 5, 1, 1, 6))
    assert len(frames) == 8  # 5 steps there, 3 back


def test_pictures_come_every_n_epochs_and_after_the_last_one_a_run_names():
    """max_epochs=-1 (a run bounded by its time) names no last epoch: not every epoch is one."""
    from types import SimpleNamespace

    from vaelab.callbacks.pictures import due

    def epochs(max_epochs):
        return [e for e in range(1, 8) if due(SimpleNamespace(
            current_epoch=e - 1, max_epochs=max_epochs, sanity_checking=False), 3)]

    assert epochs(7) == [3, 6, 7] and epochs(-1) == epochs(None) == [3, 6]
