"""Whole-split uint8 image tensors served a batch at a time.

The DataLoader hands `__getitems__` a whole batch of indices, so one batch is one slice and one
conversion: no per-image PIL, ToTensor or collate.
"""

import torch
from torch.utils.data import Dataset

BINARIZE = ("none", "static", "dynamic")


class TensorImages(Dataset):
    """uint8 images [N, C, H, W] and labels [N], served as float in [0, 1] with their labels.

    binarize: `none` keeps intensities; `static` draws x ~ Bernoulli(intensity) once (seeded) so
    every epoch sees the same binary image; `dynamic` draws afresh every time an image is served
    (the likelihood literature's convention for training).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, binarize: str = "none",
                 seed: int = 0):
        if binarize not in BINARIZE:
            raise ValueError(f"data.binarize={binarize!r} is unknown; choose one of {BINARIZE}")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} "
                             f"{list(images.shape)}")
        self.images, self.labels, self.binarize = images, labels, binarize
        if binarize == "static":
            generator = torch.Generator().manual_seed(seed)
            self.images = torch.bernoulli(images.float() / 255, generator=generator).to(torch.uint8)
            self.images.mul_(255)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        x = self.images[index].float().div_(255)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)
        return x, self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def keep_batch(batch):
    """collate_fn for `__getitems__` datasets: the batch is already stacked."""
    return batch
