"""dSprites: the rendered factor grid, the archive reader, and what offline users are told."""

import numpy as np
import pytest
import torch

from vaelab.data import dsprites
from vaelab.data.dsprites import DSpritesDataModule, flat_index, grid_classes, render


def one(shape=0, scale=5, orientation=0, x=16, y=16) -> torch.Tensor:
    return render(torch.tensor([[shape, scale, orientation, x, y]]))[0, 0]


def centroid(image: torch.Tensor) -> tuple[float, float]:
    rows, cols = image.nonzero(as_tuple=True)
    return cols.float().mean().item(), rows.float().mean().item()


def test_each_factor_changes_the_image_as_it_says():
    images = render(grid_classes(torch.arange(0, 737280, 9973)))
    assert torch.all((images == 0) | (images == 1))  # binary, as the archive
    shapes = [one(shape=s) for s in range(3)]
    assert all(not torch.equal(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1:])
    areas = [one(scale=s).sum().item() for s in range(6)]
    assert areas == sorted(areas) and areas[-1] > 3 * areas[0]  # (1 / 0.5)^2 = 4 in theory
    left, right = centroid(one(x=0)), centroid(one(x=31))
    top, bottom = centroid(one(y=0)), centroid(one(y=31))
    assert right[0] - left[0] > 30 and abs(right[1] - left[1]) < 1  # x moves right only
    assert bottom[1] - top[1] > 30 and abs(bottom[0] - top[0]) < 1  # y moves down only
    turned = one(orientation=5)  # 45 degrees: a square becomes a diamond of the same area
    assert not torch.equal(turned, one())
    assert turned.sum().item() == pytest.approx(one().sum().item(), rel=0.1)
    assert torch.equal(one(orientation=0), one(orientation=39))  # 0 and 2 pi, as in the archive


def test_the_grid_index_round_trips():
    index = torch.randint(737280, (1000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(flat_index(grid_classes(index)), index)
    assert grid_classes(torch.tensor([737279])).tolist() == [[2, 5, 39, 31, 31]]


def test_splits_and_batches_carry_the_factor_classes(tmp_path):
    data = DSpritesDataModule(source="generated", data_dir=str(tmp_path), val_size=100,
                              test_size=50, seed=3, eval_batch_size=100)
    data.prepare_data()
    data.setup()
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (737130, 100, 50)
    x, classes = next(iter(data.val_dataloader()))
    assert x.shape == (100, 1, 64, 64) and classes.shape == (100, 5)
    assert torch.equal(x, render(classes))
    assert not list(tmp_path.iterdir())  # generated: nothing written, nothing downloaded
    sampled = data.sample_factors(4000, torch.Generator().manual_seed(0))
    assert sampled.min(0).values.tolist() == [0] * 5
    assert (sampled.max(0).values + 1).tolist() == list(dsprites.SIZES)


def fake_archive(path, monkeypatch, sizes=(3, 2, 3, 2, 2)):
    """A small archive in the official layout (a colour column, then the five factors) over a
    reduced grid, holding the rendered images."""
    monkeypatch.setattr(dsprites, "SIZES", sizes)
    classes = grid_classes(torch.arange(int(np.prod(sizes))))
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, imgs=render(classes)[:, 0].numpy().astype(np.uint8),
                        latents_classes=np.concatenate([np.zeros((len(classes), 1), int),
                                                        classes.numpy()], 1))
    return classes


def test_the_archive_is_read_as_packed_bits(tmp_path, monkeypatch):
    path = tmp_path / "dsprites" / dsprites.ARCHIVE
    classes = fake_archive(path, monkeypatch)
    data = DSpritesDataModule(source="archive", data_dir=str(tmp_path), val_size=5,
                              test_size=5, download=False)
    data.prepare_data()
    data.setup()
    picked = classes[torch.tensor([7, 0, 71, 30])]
    assert torch.equal(data.draw(picked), render(picked))
    x, y = next(iter(data.test_dataloader()))
    assert torch.equal(x, render(y))


def test_an_archive_off_the_grid_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "dsprites" / dsprites.ARCHIVE
    fake_archive(path, monkeypatch)
    monkeypatch.setattr(dsprites, "SIZES", (3, 2, 3, 2, 1))
    data = DSpritesDataModule(source="archive", data_dir=str(tmp_path), download=False)
    with pytest.raises(ValueError, match="do not follow the dSprites factor grid"):
        data.draw(torch.zeros(1, 5, dtype=torch.long))


def test_offline_the_error_names_the_file_and_its_folder(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(FileNotFoundError) as err:
        DSpritesDataModule(data_dir=str(tmp_path)).prepare_data()
    message = str(err.value)
    assert dsprites.ARCHIVE in message and str(tmp_path / "dsprites") in message
    assert "name resolution" in message and "data.source=generated" in message
    with pytest.raises(FileNotFoundError, match="data.download=false"):
        DSpritesDataModule(data_dir=str(tmp_path), download=False).prepare_data()
    assert not (tmp_path / "dsprites" / dsprites.ARCHIVE).exists()
