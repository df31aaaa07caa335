"""A frozen VQ-VAE's codes of a dataset, for stage two (`experiment=vqvae_prior`): every image
is encoded once, and the codes, labels and -log p(x | z_q) of each split are cached in the run
dir, so that the prior trains on codes without running the autoencoder again each epoch."""

import hashlib
import io
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vaelab.cli import write_atomically
from vaelab.data.tensor_images import TensorDataModule

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class CodeRows(Dataset):
    """Codes [N, h, w], labels [N] and reconstruction nats [N], served a batch at a time."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor, recon: torch.Tensor):
        self.codes, self.labels, self.recon = codes, labels, recon

    def __len__(self) -> int:
        return len(self.codes)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return self.codes[index].long(), self.labels[index], self.recon[index]


def fingerprint(vae, data_spec: dict) -> str:
    """What the cached codes depend on: the autoencoder's weights and the data."""
    digest = hashlib.sha256(json.dumps(data_spec, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith("prior_net."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_split(vae, dataset, batch_size: int) -> dict[str, torch.Tensor]:
    """Codes, labels and -log p(x | z_q) of every image of a split, in order."""
    codes, labels, recon = [], [], []
    for start in range(0, len(dataset), batch_size):
        x, y, *_ = dataset.__getitems__(list(range(start, min(start + batch_size,
                                                               len(dataset)))))
        x = x.to(vae.device)
        q = vae.encode(x)
        codes.append(q.codes.to(torch.int16).cpu())
        labels.append(y.cpu())
        recon.append(-vae.decode(q.mean).log_prob(x).float().cpu())
    return {"codes": torch.cat(codes), "labels": torch.cat(labels), "recon": torch.cat(recon)}


class CodeDataModule(TensorDataModule):
    """The splits of `images` (a set-up image DataModule) as a frozen VQ-VAE's codes, computed
    once and cached in `cache` (recomputed when the weights or the data differ)."""

    def __init__(self, images, vae, data_spec: dict, cache: Path, batch_size: int,
                 eval_batch_size: int | None = None, seed: int = 0):
        super().__init__(batch_size, eval_batch_size, 0, seed, on_device=False)
        self.images, self.vae, self.data_spec, self.cache = images, vae, data_spec, Path(cache)
        self.num_classes = getattr(images, "num_classes", None)
        self.unlabelled = getattr(images, "unlabelled", 0)
        self.shape = images.shape
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        key = fingerprint(self.vae, self.data_spec)
        cached = self.read(key)
        if cached is None:
            was_training = self.vae.training
            self.vae.eval()
            try:
                cached = {split: encode_split(self.vae, getattr(self.images, f"{split}_set"),
                                              self.eval_batch_size) for split in SPLITS}
            finally:
                self.vae.train(was_training)
            self.write(key, cached)
        self.train_set, self.val_set, self.test_set = (CodeRows(**cached[s]) for s in SPLITS)
        log.info("codes of %s train / %s val / %s test images, grid %s",
                 *(len(getattr(self, f"{s}_set")) for s in SPLITS),
                 list(cached["train"]["codes"].shape[1:]))

    def read(self, key: str) -> dict | None:
        if not self.cache.is_file():
            return None
        try:
            stored = torch.load(self.cache, weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged cache is only recomputed
            log.warning("%s could not be read (%s); the codes are computed again", self.cache,
                        err)
            return None
        if stored.get("fingerprint") != key:
            log.info("%s belongs to other weights or data; the codes are computed again",
                     self.cache)
            return None
        return stored["splits"]

    def write(self, key: str, splits: dict) -> None:
        buffer = io.BytesIO()
        torch.save({"fingerprint": key, "splits": splits}, buffer)
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.cache, buffer.getvalue())
