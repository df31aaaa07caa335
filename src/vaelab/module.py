"""VAEModule: one training step is the objective plus logging, nothing else.

The hyperparameters are plain dicts (Hydra `_target_` specs as strings), so a checkpoint loads
with `VAEModule.load_from_checkpoint(path, weights_only=True)` and no Hydra config around it.
"""

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from vaelab.models.vae import VAE

STAGES = ("train", "val", "test")


class VAEModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        likelihood: dict[str, Any],
        objective: dict[str, Any],
        optimizer: dict[str, Any],
        data_shape: Sequence[int],
        latent_dim: int,
        scheduler: dict[str, Any] | None = None,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        # Logged to TensorBoard's HParams tab once, with the final metrics (see cli/train.py).
        self.save_hyperparameters(logger=False)
        self.vae: VAE = instantiate(model, data_shape=list(data_shape), latent_dim=latent_dim,
                                    likelihood=instantiate(likelihood))
        self.objective = instantiate(objective)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x = batch[0]
        out = self.objective(self.vae, x)
        kw = dict(on_step=stage == "train", on_epoch=True, batch_size=len(x), sync_dist=True)
        self.log(f"{stage}/loss", out["loss"].detach(), prog_bar=True, **kw)
        self.log_dict({f"{stage}/{k}": v.detach() for k, v in out.items() if k != "loss"}, **kw)
        return out["loss"]

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        spec = dict(self.hparams.scheduler)
        interval, monitor = spec.pop("interval", "epoch"), spec.pop("monitor", "val/loss")
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": instantiate(spec)(optimizer), "interval": interval, "monitor": monitor}}
