"""VAEModule: one training step is the objective plus logging, nothing else.

The hyperparameters are plain dicts (Hydra `_target_` specs as strings), so a checkpoint loads
with `VAEModule.load_from_checkpoint(path, weights_only=True)` and no Hydra config around it.
"""

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from vaelab.evaluation import bits_per_dim
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
        # Training metrics summed over the epoch so far (see training_step).
        self._train_sums: torch.Tensor | None = None
        self._train_count = 0
        self._train_keys: list[str] = []
        self._rng_states: dict | None = None  # from a checkpoint, applied in on_train_start

    def _logs_this_step(self) -> bool:
        every = self.trainer.log_every_n_steps
        return bool(every) and (self.global_step + 1) % every == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x = batch[0]
        out = self.objective(self.vae, x, step=self.global_step)
        kw = dict(on_step=False, on_epoch=True, batch_size=len(x), sync_dist=True)
        self.log(f"{stage}/loss", out["loss"].detach(), prog_bar=True, **kw)
        self.log_dict({f"{stage}/{k}": v.detach() for k, v in out.items() if k != "loss"}, **kw)
        self.log(f"{stage}/bpd", bits_per_dim(out["nelbo"].detach(), self.vae), **kw)
        return out["loss"]

    def training_step(self, batch, batch_idx):
        """The epoch means are summed here and logged once per epoch (`on_train_epoch_end`);
        per-step values only every `trainer.log_every_n_steps` steps. Calling `self.log` for
        every metric at every step cost a quarter of an MLP epoch on the CPU."""
        x = batch[0]
        out = self.objective(self.vae, x, step=self.global_step)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}); training stopped before the weights changed, and "
                f"the last good checkpoint is kept. Try a lower lr, gradient clipping "
                f"(trainer.gradient_clip_val=1.0) or trainer.precision=32-true.")
        values = torch.stack([v.detach().float() for v in out.values()])
        sums = self._train_sums
        self._train_sums = values * len(x) + (0 if sums is None else sums)
        self._train_count += len(x)
        self._train_keys = list(out)
        if self._logs_this_step():
            self.log_dict({f"train/{k}_step": v for k, v in zip(out, values, strict=True)},
                          on_step=True, on_epoch=False, batch_size=len(x))
            self.log("train/loss", values[0], prog_bar=True, logger=False, on_step=True,
                     on_epoch=False, batch_size=len(x))
        return loss

    def on_train_epoch_end(self):
        if self._train_sums is None:
            return
        means = self._train_sums / self._train_count
        self.log_dict({f"train/{k}_epoch": v for k, v in zip(self._train_keys, means,
                                                             strict=True)},
                      on_step=False, on_epoch=True, sync_dist=True)
        self._train_sums, self._train_count = None, 0

    def on_before_optimizer_step(self, optimizer):
        """Stop before a non-finite gradient reaches the weights (fp16's scaler skips those
        steps itself, so it is left to do so)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if getattr(self.trainer.precision_plugin, "scaler", None) is None and not torch.isfinite(
                norm):
            raise FloatingPointError(
                f"non-finite gradient norm ({norm.item()}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}); training stopped before the weights changed, and "
                f"the last good checkpoint is kept. Try a lower lr or gradient clipping "
                f"(trainer.gradient_clip_val=1.0).")
        if self._logs_this_step():
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint):
        """The RNG states, so that a resumed run draws the same batches and latents as an
        uninterrupted one (Lightning does not save them)."""
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all()}

    def on_load_checkpoint(self, checkpoint):
        self._rng_states = checkpoint.get("rng_states")

    def on_train_start(self):
        # Restored here, after Lightning's sanity check, which an uninterrupted run did not do
        # at this point and which draws latents.
        states, self._rng_states = self._rng_states, None
        if states:
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

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
