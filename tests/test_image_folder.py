"""Image folders: mixed formats and modes, junk files, splits, labels, caching, errors, training."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import ImageFolderDataModule
from vaelab.data.image_folder import stable_split
from vaelab.likelihoods import GaussianLikelihood
from vaelab.models import ConvVAE
from vaelab.models.conv import stages_for
from vaelab.training import train


def save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of mixed files: RGB jpg/png/bmp/webp/tif, RGBA, LA, greyscale, palette (with
    transparency), 16-bit greyscale, plus a corrupt PNG, a truncated JPEG and a text file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    red = np.zeros((40, 60, 3), np.uint8)
    red[..., 0] = 200
    for i, ext in enumerate(["jpg", "png", "bmp", "webp", "tif", "jpeg"]):
        noisy = np.clip(red.astype(int) + rng.integers(0, 40, red.shape), 0, 255).astype(np.uint8)
        save(root / "cats" / f"rgb{i}.{ext}", noisy)
    transparent = np.zeros((30, 30, 4), np.uint8)  # fully transparent: becomes the background
    save(root / "cats" / "rgba.png", transparent)
    save(root / "dogs" / "grey.png", np.full((50, 50), 100, np.uint8))
    save(root / "dogs" / "la.png", np.stack([np.full((20, 20), 0, np.uint8),
                                             np.full((20, 20), 255, np.uint8)], -1), "LA")
    palette = Image.fromarray(np.full((16, 16, 3), (0, 0, 255), np.uint8)).convert("P")
    palette.save(root / "dogs" / "palette.gif")
    deep = Image.fromarray(np.full((24, 24), 65535, np.uint16))  # 16-bit white
    deep.save(root / "dogs" / "deep.png")
    for i in range(14):
        save(root / "dogs" / "nested" / f"more{i}.png",
             rng.integers(0, 255, (32, 32, 3)).astype(np.uint8))
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    jpeg = root / "cats" / "rgb0.jpg"
    (root / "cats" / "truncated.jpg").write_bytes(jpeg.read_bytes()[:200])
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


def datamodule(path, **kwargs):
    kwargs = {"image_size": 16, "channels": 3, "batch_size": 4, "val_fraction": 0.2,
              "test_fraction": 0.2, "decode_workers": 2, **kwargs}
    dm = ImageFolderDataModule(str(path), **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def everything(dm):
    sets = [dm.train_set, dm.val_set, dm.test_set]
    xs, ys = zip(*(s.__getitems__(list(range(len(s)))) for s in sets if len(s)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_counts_labels_shapes_ranges_and_skipped_files(folder, caplog):
    with caplog.at_level(logging.WARNING):
        dm = datamodule(folder)
    x, y = everything(dm)
    assert len(x) == 7 + 4 + 14  # 7 cat images, 4 dog images, 14 nested dogs; 2 corrupt dropped
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert dm.classes == ["cats", "dogs"] and set(y.tolist()) == {0, 1}
    assert (y == 0).sum() == 7
    warning = [r.message for r in caplog.records if "could not be read" in r.message]
    assert len(warning) == 1 and "2 of 27 files" in warning[0]
    assert "broken.png" in warning[0] and "truncated.jpg" in warning[0]


def test_modes_are_converted_and_transparency_composited(folder, tmp_path):
    dm = datamodule(folder, val_fraction=0.0, test_fraction=0.0, background=(0, 255, 0),
                    cache_dir=str(tmp_path / "cache"))
    names = [f.relative_to(folder).as_posix() for f in dm.files]
    images = dm.train_set.images

    def pixel(name):
        return images[[n for n in names if n != "dogs/broken.png"
                       and n != "cats/truncated.jpg"].index(name)][:, 8, 8].tolist()

    assert pixel("cats/rgba.png") == [0, 255, 0]    # transparent -> the background colour
    assert pixel("dogs/la.png") == [0, 0, 0]        # opaque black LA stays black
    assert pixel("dogs/grey.png") == [100, 100, 100]
    assert pixel("dogs/palette.gif") == [0, 0, 255]
    assert pixel("dogs/deep.png") == [255, 255, 255]  # 16-bit white is 8-bit white
    assert pixel("cats/rgb1.png")[0] >= 200 and pixel("cats/rgb1.png")[2] < 40


def test_greyscale_channel(folder):
    dm = datamodule(folder, channels=1, image_size=8)
    assert dm.train_set.images.shape[1:] == (1, 8, 8) and dm.shape == (1, 8, 8)


def test_split_is_stable_when_files_are_added_elsewhere(folder, tmp_path):
    names = [f"class{i % 3}/img{i}.png" for i in range(300)]
    before = {n: stable_split(n, 0, (0.1, 0.1)) for n in names}
    after = {n: stable_split(n, 0, (0.1, 0.1)) for n in names + ["new/extra.png"]}
    assert all(before[n] == after[n] for n in names)
    counts = {s: list(before.values()).count(s) for s in ("train", "val", "test")}
    assert 15 <= counts["val"] <= 45 and 15 <= counts["test"] <= 45
    assert stable_split("a.png", 0, (0.1, 0.1)) == stable_split("a.png", 0, (0.1, 0.1))


def test_explicit_split_folders_are_honoured(tmp_path):
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        for i in range(n):
            save(tmp_path / split / ("a" if i % 2 else "b") / f"{i}.png",
                 np.full((8, 8, 3), 10 * i, np.uint8))
    dm = datamodule(tmp_path)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (5, 2, 3)
    assert dm.classes == ["a", "b"]


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(6):
        save(tmp_path / f"{i}.png", np.full((8, 8, 3), 20 * i, np.uint8))
    x, y = everything(datamodule(tmp_path, val_fraction=0.0, test_fraction=0.0))
    assert len(x) == 6 and set(y.tolist()) == {-1}


def test_second_setup_reads_the_cache_and_decodes_nothing(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = datamodule(folder, cache_dir=str(cache))
    assert len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob("*partial*"))

    def no_decoding(*args):
        raise AssertionError("decoded an image although the cache was there")

    monkeypatch.setattr("vaelab.data.image_folder._decode_many", no_decoding)
    second = datamodule(folder, cache_dir=str(cache))
    assert torch.equal(first.train_set.images, second.train_set.images)
    large = datamodule(folder, cache_dir=str(cache), memory_limit_gb=0)  # memory-mapped
    assert large.train_set.rows is not None
    assert torch.equal(everything(large)[0], everything(first)[0])


def test_strict_turns_skipping_into_an_error(folder):
    with pytest.raises(ValueError, match="could not be read.*strict"):
        datamodule(folder, strict=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "holds no images"),
])
def test_missing_or_empty_folder_fails_at_once_naming_the_path(tmp_path, make, message):
    (tmp_path / "readme.txt").write_text("no images here")
    path = make(tmp_path)
    with pytest.raises(FileNotFoundError, match=message) as err:
        ImageFolderDataModule(str(path))
    assert str(path) in str(err.value)


def test_a_folder_of_only_unreadable_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of its 2 image files could be read"):
        datamodule(tmp_path, strict=False)


def test_conv_stages_follow_the_image_size():
    assert [stages_for(s) for s in (28, 32, 64, 128)] == [2, 3, 4, 5]
    vae = ConvVAE((3, 64, 64), 8, GaussianLikelihood(), batch_norm=True)
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in vae.decoder)


@pytest.mark.parametrize("size", [64, 128])
def test_fast_dev_run_on_colour_images(compose_train, folder, tmp_path, size):
    cfg = compose_train("data=image_folder", f"data.path={folder}", f"data.image_size={size}",
                        "model=conv", "debug=fdr", f"data.cache_dir={tmp_path / 'cache'}",
                        "data.batch_size=4", tiny=False)
    assert cfg.likelihood._target_.endswith("LogisticMixtureLikelihood")  # the default for images
    metrics = train(cfg)
    assert np.isfinite(metrics["test/nelbo"]) and metrics["test/bpd"] > 0
    seed = compose_train("experiment=seed002_products", f"data.path={folder}", tiny=False)
    assert seed.data.image_size == 128 and seed.model.batch_norm


@pytest.mark.parametrize("likelihood", [["likelihood=dlogistic", "likelihood.components=3"],
                                        ["likelihood=dlogistic_local", "likelihood.hidden=8",
                                         "likelihood.auxiliary=1"],
                                        ["likelihood=gaussian", "likelihood.scale=pixel",
                                         "likelihood.discretized=true"]])
def test_discrete_likelihoods_train_on_a_latent_map_with_exact_bits_per_dim(
        compose_train, folder, tmp_path, likelihood):
    cfg = compose_train("data=image_folder", f"data.path={folder}", "data.image_size=32",
                        "model.latent_map=4", "latent_dim=4", *likelihood, "debug=fdr",
                        f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4", tiny=False)
    metrics = train(cfg)
    dims = 3 * 32 * 32
    assert np.isfinite(metrics["test/nelbo"]) and metrics["test/nelbo"] > 0  # a probability
    assert metrics["test/bpd"] == pytest.approx(metrics["test/nelbo"] / (dims * math.log(2)),
                                                rel=1e-4)  # no bin width added


def test_odd_names_and_broken_links_are_skipped_or_read(tmp_path, caplog):
    import os

    for i in range(6):
        save(tmp_path / "a" / f"{i}.png", np.full((8, 8, 3), 30 * i, np.uint8))
    odd = os.fsencode(str(tmp_path / "a")) + b"/caf\xe9.png"  # Latin-1, not valid UTF-8
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(odd.decode(errors="surrogateescape"))
    (tmp_path / "a" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "a" / "loop.png").symlink_to(tmp_path / "a" / "loop.png")
    (tmp_path / "a" / "up").symlink_to(tmp_path, target_is_directory=True)  # a folder loop
    with caplog.at_level(logging.WARNING):
        dm = datamodule(tmp_path, val_fraction=0.0, test_fraction=0.0)
    assert len(dm.train_set) == 7  # the six, and the odd name
    assert "2 links" in caplog.text


def test_a_damaged_cache_is_rebuilt_and_a_read_only_folder_caches_elsewhere(tmp_path,
                                                                          monkeypatch):
    import vaelab.data.image_folder as image_folder

    for i in range(5):
        save(tmp_path / "imgs" / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    first = datamodule(tmp_path / "imgs", val_fraction=0.0, test_fraction=0.0)
    (ok,) = (tmp_path / "imgs" / ".vaelab_cache").glob("*.ok.npy")
    ok.write_bytes(ok.read_bytes()[:10])  # as a crash mid-write would have left it
    again = datamodule(tmp_path / "imgs", val_fraction=0.0, test_fraction=0.0)
    assert torch.equal(again.train_set.images, first.train_set.images)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(image_folder, "writable_dir", lambda path: False)
    elsewhere = datamodule(tmp_path / "imgs", val_fraction=0.0, test_fraction=0.0)
    assert str(elsewhere.cache_dir).startswith(str(tmp_path / "home-cache"))
    assert list(elsewhere.cache_dir.glob("*.npy"))


def test_a_folder_whose_images_all_went_to_validation_says_so(tmp_path):
    save(tmp_path / "one.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="fell into the training split.*set both to 0"):
        datamodule(tmp_path, val_fraction=0.5, test_fraction=0.49, seed=1)
