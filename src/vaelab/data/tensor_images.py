"""Whole-split uint8 image tensors served a batch at a time.

The DataLoader hands `__getitems__` a whole batch of indices, so one batch is one slice and one
conversion: no per-image PIL, ToTensor or collate.
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vaelab.data.corruption import Corruption, from_config


class TensorImages(Dataset):
    """uint8 images [N, C, H, W] and labels [N], served as float in [0, 1] with their labels.

    binarize: `none` keeps intensities; `static` draws x ~ Bernoulli(intensity) once (seeded) so
    every epoch sees the same binary image; `dynamic` draws afresh every time an image is served
    (the likelihood literature's convention for training).

    corruption: each image is served with its corrupted copy, what a denoising VAE's encoder
    sees (x, label, seen): freshly drawn each time when `fresh_noise` (training), else one
    seeded draw per image (validation, test). Both are 8-bit images, as the clean ones are.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, binarize: str = "none",
                 seed: int = 0, rows: torch.Tensor | None = None,
                 corruption: Corruption | None = None, fresh_noise: bool = True):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} "
                             f"{list(images.shape)}")
        self.images, self.labels, self.binarize = images, labels, binarize
        # `rows`: this split's rows of a larger (memory-mapped) tensor, read only when served.
        self.rows = rows
        if binarize == "static":
            generator = torch.Generator().manual_seed(seed)
            self.images = torch.bernoulli(images.float() / 255, generator=generator).to(torch.uint8)
            self.images.mul_(255)
        self.corruption, self.seen = corruption, None
        if corruption is not None and not fresh_noise:
            clean = self.images if rows is None else self.images[rows]
            generator = torch.Generator().manual_seed(seed + 1000)
            self.seen = eight_bit(corruption(clean.float() / 255, generator))

    def to(self, device) -> "TensorImages":
        """Keep the whole split on `device` (a GPU): batches are then sliced there."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.rows = None if self.rows is None else self.rows.to(device)
        self.seen = None if self.seen is None else self.seen.to(device)
        return self

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        position = torch.as_tensor(indices, device=self.images.device)
        index = position if self.rows is None else self.rows[position]
        x = self.images[index].float().div_(255)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)
        if self.corruption is None:
            return x, self.labels[index]
        if self.seen is not None:
            return x, self.labels[index], self.seen[position].float().div_(255)
        return x, self.labels[index], eight_bit(self.corruption(x)).float().div_(255)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(part[0] for part in self.__getitems__([i]))


def eight_bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as uint8 levels."""
    return x.mul(255).round_().to(torch.uint8)


def keep_batch(batch):
    """collate_fn for `__getitems__` datasets: the batch is already stacked."""
    return batch


class TensorDataModule(L.LightningDataModule):
    """What every vaelab DataModule shares once its splits are `TensorImages`: loaders that hand
    whole batches through, shuffling from a generator saved in checkpoints (so a resumed run sees
    the batches an uninterrupted one would, and loaders never touch the global RNG), and, when
    training on a GPU, the splits kept there."""

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int,
                 seed: int, on_device: bool, corruption: str | None = None,
                 corruption_strength: float = 0.25):
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.on_device = num_workers, seed, on_device
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.corruption = from_config(corruption, corruption_strength)

    def state_dict(self):
        return {"shuffle_generator": self.shuffle_generator.get_state()}

    def load_state_dict(self, state):
        self.shuffle_generator.set_state(state["shuffle_generator"])

    def place(self, *splits: TensorImages) -> None:
        """Move in-memory splits to the training GPU, if there is one."""
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if self.on_device and self.num_workers == 0 and device is not None \
                and device.type == "cuda":
            for split in splits:
                split.to(device)

    def _loader(self, dataset, shuffle: bool, batch_size: int) -> DataLoader:
        generator = self.shuffle_generator if shuffle else torch.Generator()
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.num_workers, collate_fn=keep_batch,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self):
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self):
        return self._loader(self.test_set, False, self.eval_batch_size)
