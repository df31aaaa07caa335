"""MNIST and Fashion-MNIST as LightningDataModules on torchvision's datasets.

torchvision reads (and, online, downloads) the IDX files; the decoded uint8 tensors are then served
from memory by `TensorImages`.
"""

import math
import struct
from pathlib import Path

import torch
from torchvision import datasets

from vaelab.data.tensor_images import TensorDataModule, TensorImages
from vaelab.errors import BadValue, MissingFile

DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}


def check_idx(path: Path) -> tuple[int, ...]:
    """The file's dimensions, or an error naming it and what is wrong, before torchvision reads
    it: the IDX header (two zero bytes, type 0x08 for unsigned bytes, the number of dimensions,
    then each dimension as a big-endian uint32) must describe exactly the bytes that follow."""
    data = path.read_bytes()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise BadValue(f"{path} is not an IDX file of unsigned bytes (its first bytes are "
                       f"{data[:4].hex() or 'missing'}, expected 0000 08 0n); replace it with "
                       f"the original file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise BadValue(f"{path} is truncated inside its header; replace it with the original")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(data) != expected:
        raise BadValue(f"{path} holds {len(data)} bytes but its header {list(dims)} promises "
                       f"{expected} (truncated or corrupt); replace it with the original")
    return dims


def check_pair(raw: Path, dims: dict[str, tuple[int, ...]]) -> None:
    """Each split's images file must hold [N, 28, 28] and its labels file [N], the same N."""
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        if images not in dims or labels not in dims:
            continue
        shape, count = dims[images], dims[labels]
        if len(shape) != 3 or shape[1:] != (28, 28) or len(count) != 1 or shape[0] != count[0]:
            raise BadValue(f"{raw}: {images} holds images of shape {list(shape)} and {labels} "
                           f"labels of shape {list(count)}; they must be [N, 28, 28] and [N] "
                           f"with the same N. Replace them with the original files")


class MNISTDataModule(TensorDataModule):
    """Official train set split (seeded) into train/val; the official test set for test.

    Training on a GPU, the splits live on it (`on_device`), so a batch is one slice there and
    nothing crosses the bus. Under `binarize=dynamic`, training images are redrawn every epoch
    while val and test use one fixed seeded draw, so validation numbers stay comparable from
    epoch to epoch.
    """

    shape = (1, 28, 28)
    num_classes = 10
    unlabelled = 0

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int | float = 5000,
        binarize: str = "none",
        download: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        on_device: bool = True,
        corruption: str | None = None,
        corruption_strength: float = 0.25,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, seed, on_device, corruption,
                         corruption_strength)
        if dataset not in DATASETS:
            raise BadValue(f"data.dataset={dataset!r} is unknown; choose one of {list(DATASETS)}")
        self.dataset_class = DATASETS[dataset]
        self.data_dir = Path(data_dir).expanduser()
        self.val_size, self.binarize, self.download = val_size, binarize, download

    def _load(self, train: bool, download: bool = False):
        return self.dataset_class(str(self.data_dir), train=train, download=download)

    def prepare_data(self):
        """Download once (rank zero); offline, say where the files must go. Files that are there
        but damaged are named, never mistaken for missing ones."""
        raw = self.data_dir / self.dataset_class.__name__ / "raw"
        present = [raw / Path(url).stem for url, _ in self.dataset_class.resources]
        check_pair(raw, {path.name: check_idx(path) for path in present if path.is_file()})
        for train in (True, False):
            try:
                self._load(train)
                continue
            except RuntimeError:  # torchvision: "Dataset not found. You can use download=True"
                pass
            files = ", ".join(Path(url).stem for url, _ in self.dataset_class.resources)
            if not self.download:
                raise MissingFile(
                    f"{self.dataset_class.__name__} not found in {raw} and data.download=false. "
                    f"Put the IDX files there ({files}) or set data.data_dir / VAELAB_DATA_DIR.")
            try:
                self._load(train, download=True)
            except Exception as err:  # noqa: BLE001 - any network failure gets the same advice
                raise MissingFile(
                    f"{self.dataset_class.__name__} is not in {raw} and could not be downloaded "
                    f"({type(err).__name__}: {err}). Offline, copy the IDX files ({files}) there, "
                    f"or point data.data_dir (or the VAELAB_DATA_DIR environment variable) at a "
                    f"folder that holds {self.dataset_class.__name__}/raw/.") from err

    def setup(self, stage: str | None = None):
        if hasattr(self, "train_set"):
            return
        full, test = self._load(train=True), self._load(train=False)
        n_val = int(round(self.val_size * len(full.data))) if isinstance(self.val_size, float) \
            else int(self.val_size)
        if not 0 < n_val < len(full.data):
            raise BadValue(f"data.val_size={self.val_size} leaves no train or no val images out "
                           f"of {len(full.data)}")
        order = torch.randperm(len(full.data), generator=torch.Generator().manual_seed(self.seed))
        images, labels = full.data.unsqueeze(1), full.targets
        train_idx, val_idx = order[n_val:], order[:n_val]
        dynamic = self.binarize == "dynamic"
        eval_binarize = "static" if dynamic else self.binarize
        self.train_set = TensorImages(images[train_idx], labels[train_idx], self.binarize,
                                      self.seed, corruption=self.corruption)
        fixed = {"corruption": self.corruption, "fresh_noise": False}
        self.val_set = TensorImages(images[val_idx], labels[val_idx], eval_binarize, self.seed + 1,
                                    **fixed)
        self.test_set = TensorImages(test.data.unsqueeze(1), test.targets, eval_binarize,
                                     self.seed + 2, **fixed)
        self.place(self.train_set, self.val_set, self.test_set)  # 55 MB: fits on any GPU
