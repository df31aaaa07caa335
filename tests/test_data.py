"""MNIST / Fashion-MNIST DataModules on tiny generated IDX files."""

import pytest
import torch

from tests.conftest import N_TEST, N_TRAIN
from vaelab.data import MNISTDataModule


def setup_dm(data_dir, **kwargs):
    kwargs = {"val_size": 16, "batch_size": 8, **kwargs}
    dm = MNISTDataModule(data_dir=str(data_dir), **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def all_batches(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_split_sizes_shapes_ranges_and_labels(data_dir, dataset):
    dm = setup_dm(data_dir, dataset=dataset)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (N_TRAIN - 16, 16, N_TEST)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, *dm.shape) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and 0 < x.mean() < 1
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))


def test_split_is_seeded_and_disjoint(data_dir):
    a, b, c = setup_dm(data_dir, seed=1), setup_dm(data_dir, seed=1), setup_dm(data_dir, seed=2)
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    train = {row.numpy().tobytes() for row in a.train_set.images}
    assert not any(row.numpy().tobytes() in train for row in a.val_set.images)


def test_datasets_differ(data_dir):
    assert not torch.equal(setup_dm(data_dir).test_set.images,
                           setup_dm(data_dir, dataset="fashion_mnist").test_set.images)


def test_static_binarization_is_binary_and_fixed(data_dir):
    dm = setup_dm(data_dir, binarize="static")
    x1, _ = all_batches(dm.val_dataloader())
    x2, _ = all_batches(dm.val_dataloader())
    assert set(x1.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x1, x2)


def test_dynamic_binarization_redraws_train_but_keeps_eval_fixed(data_dir):
    dm = setup_dm(data_dir, binarize="dynamic")
    first = dm.train_set.__getitems__(list(range(32)))[0]
    second = dm.train_set.__getitems__(list(range(32)))[0]
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    # Each draw is Bernoulli(intensity): the mean over many draws approaches the grey image.
    grey = dm.train_set.images[:32].float() / 255
    mean = torch.stack([dm.train_set.__getitems__(list(range(32)))[0] for _ in range(400)]).mean(0)
    assert (mean - grey).abs().max() < 0.15
    assert torch.equal(all_batches(dm.test_dataloader())[0], all_batches(dm.test_dataloader())[0])


def test_no_binarization_keeps_intensities(data_dir):
    dm = setup_dm(data_dir)
    x, _ = all_batches(dm.test_dataloader())
    assert torch.equal(x, dm.test_set.images.float() / 255)
    assert len(x.unique()) > 2


def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "VAELAB_DATA_DIR" in message


def test_failed_download_gives_offline_advice(tmp_path, monkeypatch):
    from torchvision import datasets

    def no_network(self):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(datasets.FashionMNIST, "download", no_network)
    dm = MNISTDataModule(dataset="fashion_mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="could not be downloaded") as err:
        dm.prepare_data()
    assert "name resolution" in str(err.value) and "FashionMNIST/raw" in str(err.value)


@pytest.mark.parametrize("kwargs, key", [({"dataset": "cifar"}, "dataset")])
def test_bad_settings_name_the_key(data_dir, kwargs, key):
    with pytest.raises(ValueError, match=key):
        setup_dm(data_dir, **kwargs)


def test_val_size_as_fraction(data_dir):
    dm = MNISTDataModule(data_dir=str(data_dir), val_size=0.25)
    dm.setup()
    assert len(dm.val_set) == N_TRAIN // 4
