"""dSprites (Matthey et al., 2017): 64 x 64 binary sprites whose five generative factors are known,
the data that disentanglement is measured on.

`source: archive` reads DeepMind's `dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz` (downloaded
when missing, as torchvision does with MNIST); `source: generated` renders the same factor grid
here, so tests and offline users have ground truth without the file. Either way an image is a
function of its factor classes, which is what the disentanglement scores need: `draw(classes)`
gives the images of any factor combination, `sample_factors(n)` draws combinations uniformly.
A batch is (images [B, 1, 64, 64], factor classes [B, 5]).
"""

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vaelab.data.tensor_images import TensorDataModule
from vaelab.errors import BadValue, MissingFile

FACTORS = ("shape", "scale", "orientation", "x", "y")
SIZES = (3, 6, 40, 32, 32)
SHAPES = ("square", "ellipse", "heart")
ARCHIVE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
URL = f"https://github.com/google-deepmind/dsprites-dataset/raw/master/{ARCHIVE}"
SIDE = 64


def factor_values(classes: torch.Tensor) -> torch.Tensor:
    """Factor classes [N, 5] as the archive's values: shape 1..3, scale 0.5..1, orientation
    0..2 pi (40 steps, both ends included, as in the archive), x and y 0..1."""
    grids = [torch.arange(1.0, 4.0), torch.linspace(0.5, 1.0, 6),
             torch.linspace(0.0, 2 * math.pi, 40), torch.linspace(0.0, 1.0, 32),
             torch.linspace(0.0, 1.0, 32)]
    classes = classes.long().cpu()
    return torch.stack([grid[classes[:, i]] for i, grid in enumerate(grids)], dim=1)


def flat_index(classes: torch.Tensor) -> torch.Tensor:
    """The row of each factor combination in the archive (its images are in C order)."""
    index = torch.zeros(len(classes), dtype=torch.long, device=classes.device)
    for i, size in enumerate(SIZES):
        index = index * size + classes[:, i].long()
    return index


def grid_classes(index: torch.Tensor) -> torch.Tensor:
    """flat_index's inverse: rows [N] -> factor classes [N, 5]."""
    columns = []
    for size in reversed(SIZES):
        columns.append(index % size)
        index = index // size
    return torch.stack(columns[::-1], dim=1)


def render(classes: torch.Tensor) -> torch.Tensor:
    """Binary sprites [N, 1, 64, 64] for factor classes [N, 5], computed pixel by pixel: a
    square, an ellipse (2:1) or a heart, half-width 8 px x scale, rotated about its centre, whose
    centre moves over pixels 13..51 in x and y."""
    values = factor_values(classes)
    shape, scale, angle, x, y = values.T
    pixel = (torch.arange(SIDE, dtype=torch.float32) + 0.5) / SIDE
    cx, cy = 0.2 + 0.6 * x, 0.2 + 0.6 * y
    half = 0.125 * scale
    du = (pixel[None, None, :] - cx[:, None, None]) / half[:, None, None]  # [N, 1, W]
    dv = (pixel[None, :, None] - cy[:, None, None]) / half[:, None, None]  # [N, H, 1]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    p, q = cos * du + sin * dv, -sin * du + cos * dv  # coordinates in the sprite's own frame
    square = torch.maximum(p.abs(), q.abs()) <= 1
    ellipse = p ** 2 + (2 * q) ** 2 <= 1
    hp, hq = p * 1.15, -q * 1.15 + 0.15  # the heart's point downwards, its middle centred
    heart = (hp ** 2 + hq ** 2 - 1) ** 3 - hp ** 2 * hq ** 3 <= 0
    kind = shape.long()[:, None, None]
    image = torch.where(kind == 1, square, torch.where(kind == 2, ellipse, heart))
    return image.float()[:, None]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Rows of bits [N, 64, 8] (numpy's packbits, big-endian) -> float images [N, 1, 64, 64]."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(len(packed), 1, SIDE, SIDE).float()


class FactorImages(Dataset):
    """The images of a list of factor combinations, drawn a batch at a time."""

    def __init__(self, classes: torch.Tensor, draw):
        self.classes, self.draw = classes, draw

    def __len__(self) -> int:
        return len(self.classes)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        classes = self.classes[torch.as_tensor(indices, device=self.classes.device)]
        return self.draw(classes), classes

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def to(self, device) -> "FactorImages":
        self.classes = self.classes.to(device)
        return self


class DSpritesDataModule(TensorDataModule):
    """All 737,280 factor combinations, in a seeded order: the first `test_size` are the test
    split, the next `val_size` validation, the rest training (the disentanglement literature
    trains on every image; holding two small sets out keeps the ELBO honest)."""

    shape = (1, SIDE, SIDE)
    factor_names, factor_sizes = FACTORS, SIZES
    num_classes = None  # a batch's labels are its factor classes [B, 5], not one class
    unlabelled = 0

    def __init__(self, source: str = "archive", data_dir: str = "data", batch_size: int = 64,
                 eval_batch_size: int | None = None, val_size: int = 10_000,
                 test_size: int = 10_000, download: bool = True, num_workers: int = 0,
                 seed: int = 0, on_device: bool = True):
        super().__init__(batch_size, eval_batch_size, num_workers, seed, on_device)
        self.source, self.download = source, download
        self.path = Path(data_dir).expanduser() / "dsprites" / ARCHIVE
        self.val_size, self.test_size = val_size, test_size
        self._packed: torch.Tensor | None = None

    def prepare_data(self):
        """Download the archive once (rank zero); offline, say which file goes where."""
        if self.source == "generated" or self.path.is_file():
            return
        if not self.download:
            raise MissingFile(f"dSprites: {self.path.name} is not in {self.path.parent} and "
                              f"data.download=false. Put it there, or use "
                              f"data.source=generated (rendered here, no file needed).")
        from torchvision.datasets.utils import download_url

        try:
            download_url(URL, str(self.path.parent), self.path.name)
        except Exception as err:  # noqa: BLE001 - any network failure gets the same advice
            self.path.unlink(missing_ok=True)
            raise MissingFile(
                f"dSprites: {self.path.name} is not in {self.path.parent} and could not be "
                f"downloaded from {URL} ({type(err).__name__}: {err}). Offline, copy the file "
                f"there (or point data.data_dir / VAELAB_DATA_DIR at a folder holding "
                f"dsprites/{self.path.name}), or use data.source=generated.") from err

    def load_archive(self) -> torch.Tensor:
        """The archive's images as packed bits [737280, 64, 8] (377 MB instead of 3 GB), after
        checking that its rows follow the factor grid."""
        try:
            with np.load(self.path) as archive:
                images, classes = archive["imgs"], archive["latents_classes"]
        except Exception as err:  # noqa: BLE001 - a damaged zip fails in many ways
            raise BadValue(f"{self.path} could not be read as the dSprites archive "
                           f"({type(err).__name__}: {err}); delete it to download it again") \
                from err
        expected = grid_classes(torch.arange(math.prod(SIZES))).numpy()
        if images.shape != (len(expected), SIDE, SIDE) or not np.array_equal(classes[:, 1:],
                                                                             expected):
            raise BadValue(f"{self.path} holds images {list(images.shape)} that do not follow "
                           f"the dSprites factor grid {list(SIZES)}; replace it with the "
                           f"original file")
        return torch.from_numpy(np.packbits(images.astype(bool), axis=-1))

    def draw(self, classes: torch.Tensor) -> torch.Tensor:
        """Images [N, 1, 64, 64] (float 0/1) of factor classes [N, 5]."""
        if self.source == "generated":
            return render(classes.cpu()).to(classes.device)
        if self._packed is None:
            self._packed = self.load_archive()
        return unpack(self._packed[flat_index(classes.cpu())]).to(classes.device)

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n factor combinations drawn uniformly: classes [n, 5]."""
        return torch.stack([torch.randint(size, (n,), generator=generator) for size in SIZES],
                           dim=1)

    def setup(self, stage: str | None = None):
        if hasattr(self, "train_set"):
            return
        total = math.prod(SIZES)
        held_out = self.val_size + self.test_size
        if not 0 < held_out < total:
            raise BadValue(f"data.val_size + data.test_size must leave training images out "
                           f"of {total}, got {held_out}")
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))
        classes = grid_classes(order)
        test, val = classes[:self.test_size], classes[self.test_size:held_out]
        self.train_set, self.val_set, self.test_set = (
            FactorImages(split, self.draw) for split in (classes[held_out:], val, test))
        self.place(self.train_set, self.val_set, self.test_set)
