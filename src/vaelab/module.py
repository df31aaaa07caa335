"""VAEModule: one step is the objective plus logging, nothing else.

The hyperparameters are plain dicts (Hydra `_target_` specs as strings), so a checkpoint loads
with `VAEModule.load_from_checkpoint(path, weights_only=True)` and no Hydra config around it.
A batch is (images, labels); the labels are the context of conditional models.
"""

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torchmetrics import Metric

from vaelab.checkpointing import read_checkpoint, roll_back_last
from vaelab.errors import Diverged
from vaelab.evaluation import bits_per_dim
from vaelab.models.vae import VAE

STAGES = ("train", "val", "test")


class EpochMeans(Metric):
    """Example-weighted means of every value an objective returns, over an epoch, as one vector:
    one update per step (about 20 us; a torchmetrics MeanMetric per value cost 250 us, a
    twentieth of a batch-20 step), synced across DDP ranks by torchmetrics."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("sums", torch.zeros(0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, weight: int) -> None:
        if self.sums.numel() != values.numel():  # the first step of an epoch
            self.sums = values.new_zeros(values.shape)
        self.sums += values * weight
        self.count += weight

    def compute(self) -> torch.Tensor:
        return self.sums / self.count


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value is finite, by GradScaler's fused check with a scale of 1 (which
    changes nothing), run as it requires: once per device and dtype, one flag per device."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    flags = {device: torch.zeros(1, device=device) for device, _ in groups}
    for (device, _), group in groups.items():
        torch._amp_foreach_non_finite_check_and_unscale_(group, flags[device],
                                                         torch.ones(1, device=device))
    return not any(flag.item() for flag in flags.values())


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
        num_classes: int | None = None,
    ):
        super().__init__()
        # Logged to TensorBoard's HParams tab once, with the final metrics (see training.py).
        self.save_hyperparameters(logger=False)
        # Only a conditional model is told the class count (the data's, see training.py).
        labelled = model.get("conditional") or model.get("conditional_prior")
        extra = {"num_classes": num_classes} if labelled else {}
        self.vae: VAE = instantiate(model, data_shape=list(data_shape), latent_dim=latent_dim,
                                    likelihood=instantiate(likelihood), **extra)
        self.objective = instantiate(objective)
        # an objective with an adversary of its own (FactorVAE's discriminator) is trained with
        # a second optimizer, step by step (Lightning's manual optimization)
        self.automatic_optimization = not hasattr(self.objective, "adversary_loss")
        # keyed "<stage>_means": a module attribute may not be called `train`
        self.means = torch.nn.ModuleDict({f"{stage}_means": EpochMeans() for stage in STAGES})
        self._keys: dict[str, list[str]] = {}
        self._rng_states: dict | None = None  # from a checkpoint, applied in on_train_start

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's loader, after refusing hyperparameters that name code vaelab does not
        declare loadable (weights_only=True alone would still hand them to `instantiate`)."""
        read_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        """Objectives that estimate the aggregate posterior (the beta-TCVAE) are told the
        training set's size."""
        datamodule = self.trainer.datamodule
        if getattr(self.objective, "dataset_size", 0) is None and datamodule is not None:
            self.objective.dataset_size = len(datamodule.train_set)

    def _means(self, stage: str) -> EpochMeans:
        return self.means[f"{stage}_means"]

    def _logs_this_step(self) -> bool:
        every = self.trainer.log_every_n_steps
        return bool(every) and (self.global_step + 1) % every == 0

    def __setattr__(self, name: str, value: Any) -> None:
        """Lightning sets `_current_fx_name` around every hook, about 40 times a step, and
        nn.Module's checks for parameters, buffers and submodules cost 0.03 to 0.13 ms a step
        (docs/speed.md). A hook's name is none of those, so it goes straight to the instance."""
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae.reconstruct(x, context)

    def losses(self, batch) -> dict[str, torch.Tensor]:
        """The objective on one batch. A batch of corrupted data (`data.corruption`) carries what
        the encoder sees as a third element."""
        x, y, *seen = batch
        context = y if self.vae.conditional else None
        self.vae.check_context(context)
        extra = {"inputs": seen[0]} if seen else {}  # an objective of one's own may not take it
        return self.objective(self.vae, x, context, step=self.global_step, **extra)

    def _step(self, batch, stage: str) -> dict[str, torch.Tensor]:
        """`losses` on one batch, its values summed into the epoch's means."""
        out = self.losses(batch)
        values = torch.stack([v.detach().float() for v in out.values()])
        self._means(stage).update(values, len(batch[0]))
        self._keys[stage] = list(out)
        return out

    def _log_epoch(self, stage: str) -> None:
        """`<stage>/<key>` for every key the objective returned, once per epoch, the same names
        in train, val and test (and `bpd`, bits per dimension of the negative ELBO)."""
        if stage not in self._keys or not self._means(stage).update_called:
            return
        values = self._means(stage).compute().reshape(-1)  # torchmetrics squeezes one value
        means = dict(zip(self._keys[stage], values, strict=True))
        if "nelbo" in means:
            means["bpd"] = bits_per_dim(means["nelbo"], self.vae)
        self.log_dict({f"{stage}/{k}": v for k, v in means.items()}, on_step=False,
                      on_epoch=True, prog_bar=False)
        self.log(f"{stage}_loss", means["loss"], prog_bar=True, logger=False)
        self._means(stage).reset()

    def training_step(self, batch, batch_idx):
        """Per-step values only every `trainer.log_every_n_steps` steps (`train_step/<key>`):
        calling `self.log` for every metric at every step cost a quarter of an MLP epoch."""
        out = self._step(batch, "train")
        loss = out["loss"]
        if not torch.isfinite(loss):
            self._stop(f"non-finite training loss ({loss.item()})")
        if not self.automatic_optimization:
            self._adversarial_step(batch, loss)
        if self._logs_this_step():
            self.log_dict({f"train_step/{k}": v.detach().float() for k, v in out.items()},
                          on_step=True, on_epoch=False, batch_size=len(batch[0]))
            self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True,
                     on_epoch=False, batch_size=len(batch[0]))
        return loss

    def _adversarial_step(self, batch, loss: torch.Tensor) -> None:
        """The VAE's step on `loss`, then the adversary's on its own loss (FactorVAE)."""
        vae_optimizer, adversary_optimizer = self.optimizers()
        vae_optimizer.zero_grad()
        self.manual_backward(loss)
        vae_optimizer.step()
        x, y, *_ = batch
        adversary_loss = self.objective.adversary_loss(self.vae, x,
                                                       y if self.vae.conditional else None)
        adversary_optimizer.zero_grad()
        self.manual_backward(adversary_loss)
        adversary_optimizer.step()
        self.log("train/adversary_loss", adversary_loss.detach(), on_step=False, on_epoch=True,
                 batch_size=len(x))
        # Lightning leaves schedulers to manual optimization too (a plateau scheduler, which
        # needs its metric, is not stepped here)
        scheduler = self.lr_schedulers()
        interval = (self.hparams.scheduler or {}).get("interval", "epoch")
        if scheduler is not None and (interval == "step" or self.trainer.is_last_batch) \
                and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()

    def _stop(self, what: str) -> None:
        """Stop before the weights change. The current weights made the non-finite value, so a
        last.ckpt saved with them is rolled back to the one before (rank zero writes files)."""
        callback = self.trainer.checkpoint_callback
        where = "no checkpoint is written"
        if callback is not None and callback.dirpath and self.trainer.is_global_zero:
            where = roll_back_last(callback.dirpath, self.global_step)
        raise Diverged(
            f"{what} at global step {self.global_step} (epoch {self.current_epoch}); training "
            f"stopped before the weights changed; {where}. Try a lower lr, gradient clipping "
            f"(trainer.gradient_clip_val=1.0) or trainer.precision=32-true.")

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def on_before_optimizer_step(self, optimizer):
        """Stop before a non-finite gradient reaches the weights (fp16's scaler skips those
        steps itself, so it is left to do so). The norm is taken on logging steps only; the
        others get GradScaler's fused check (0.1 to 0.2 ms of a 3.5 ms batch-20 IWAE step, the
        norm 0.3 ms). The gradients are this optimizer's: walking the module tree for them cost
        30 us a step."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        checked = getattr(self.trainer.precision_plugin, "scaler", None) is None
        if self._logs_this_step():
            norm = torch.nn.utils.get_total_norm(grads)
            if checked and not torch.isfinite(norm):
                self._stop(f"non-finite gradient norm ({norm.item()})")
            self.log("train_step/grad_norm", norm, on_step=True, on_epoch=False)
        elif checked and not all_finite(grads):
            self._stop("non-finite gradient")

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
        # frozen parts (a VQ-VAE's autoencoder in stage two) are left out
        trained = [p for p in self.vae.parameters() if p.requires_grad]
        optimizer = instantiate(self.hparams.optimizer)(trained)
        optimizers = [{"optimizer": optimizer}]
        if self.hparams.scheduler:
            spec = dict(self.hparams.scheduler)
            interval, monitor = spec.pop("interval", "epoch"), spec.pop("monitor", "val/nelbo")
            optimizers[0]["lr_scheduler"] = {"scheduler": instantiate(spec)(optimizer),
                                             "interval": interval, "monitor": monitor}
        if not self.automatic_optimization:
            optimizers.append({"optimizer": self.objective.adversary_optimizer()})
        if len(optimizers) > 1:
            return optimizers
        return optimizers[0] if "lr_scheduler" in optimizers[0] else optimizer
