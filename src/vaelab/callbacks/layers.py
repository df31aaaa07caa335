"""Each stochastic layer's KL and active units, for models with more than one (model=lvae):
upper layers that stop carrying information (posterior collapse, the classic failure of deep
hierarchies) show as a KL and an active-unit count falling to zero."""

import logging

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from vaelab import pictures
from vaelab.callbacks.pictures import due, logged_step
from vaelab.evaluation import active_units

log = logging.getLogger(__name__)


class LayerStats(L.Callback):
    """After validation every `every_n_epochs` epochs and the last: `layers/kl_z<i>` (nats,
    the mean over the first `n_images` validation images of one posterior draw each) and
    `layers/active_z<i>` (units with Cov_x(E_q[z_u]) > 0.01), i = 1 at the bottom."""

    def __init__(self, every_n_epochs: int = 1, n_images: int = 1000):
        self.every_n_epochs, self.n_images = every_n_epochs, n_images

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, module):
        vae = module.vae
        if len(vae.layer_sizes) < 2 or not due(trainer, self.every_n_epochs):  # as the pictures
            return
        try:
            metrics = self.measure(vae, trainer.val_dataloaders)
        except Exception as err:  # noqa: BLE001 - a summary must never cost a run
            log.warning("layers/* skipped at step %d: %s: %s", trainer.global_step,
                        type(err).__name__, err)
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logged_step(trainer))

    @torch.no_grad()
    def measure(self, vae, batches) -> dict[str, float]:
        was_training = vae.training
        vae.eval()
        kls, means, seen = None, [], 0
        try:
            for x, y, *inputs in batches:
                x, y = x[: self.n_images - seen].to(vae.device), y[: self.n_images - seen]
                context = pictures.context_of(vae, y)
                q = vae.encode(inputs[0][: len(x)].to(vae.device) if inputs else x, context)
                parts = [k.sum() for k in vae.kl_layers(q, q.sample(), context)]
                kls = parts if kls is None else [a + b for a, b in zip(kls, parts, strict=True)]
                means.append(q.mean.cpu())
                seen += len(x)
                if seen >= self.n_images:
                    break
        finally:
            vae.train(was_training)
        if not seen:
            raise ValueError("the validation split is empty")
        layers = torch.cat(means).split(vae.layer_sizes, -1)
        out = {f"layers/kl_z{i + 1}": (kl / seen).item() for i, kl in enumerate(kls)}
        out.update({f"layers/active_z{i + 1}": float(active_units(m))
                    for i, m in enumerate(layers)})
        return out
