"""The codebook of a model with discrete codes (model=vqvae), the numbers a VQ user watches:
how many codes are in use and the perplexity of their use (codebook collapse shows as both
falling), a histogram of code usage, and the code maps of a few images. A learned prior's
samples are drawn beside the uniform prior's."""

import logging

import torch
from lightning.pytorch.utilities import rank_zero_only

from vaelab import loggers, pictures
from vaelab.callbacks.pictures import Picture, logged_step, tensorboard
from vaelab.models.vq import code_usage, perplexity

log = logging.getLogger(__name__)


class CodebookStats(Picture):
    """After validation every `every_n_epochs` epochs and the last: `codebook/perplexity`,
    `codebook/codes_in_use` over the first `usage_images` validation images, the histogram
    `codebook/usage`, and the pictures `pictures/code_grids` (the first `n_images` above
    their code maps) and, with a learned prior, `pictures/samples_uniform_prior`. Nothing for a
    model with continuous latents."""

    tag = "pictures/code_grids"

    def __init__(self, usage_images: int = 1000, n_images: int = 16, nrow: int = 8, **kwargs):
        super().__init__(n_images=n_images, **kwargs)
        self.usage_images, self.nrow = usage_images, nrow

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, module):
        if module.vae.codebook_size and self.due(trainer):
            self.draw_now(trainer, module)

    def draw_now(self, trainer, module):
        was_training = module.training
        module.eval()
        try:
            if not module.vae.frozen:  # stage two's codebook does not change
                self.codebook(trainer, module)
            if module.vae.prior_net.learned and loggers.takes_images(trainer.loggers):
                with module.vae.uniform_prior():
                    grid = pictures.sample_grid(module.vae, 64, self.nrow, self.seed)
                loggers.log_picture(trainer.loggers, "pictures/samples_uniform_prior", grid,
                                    logged_step(trainer))
        except Exception as err:  # noqa: BLE001 - a summary must never cost a run
            log.warning("codebook/* skipped at step %d: %s: %s", trainer.global_step,
                        type(err).__name__, err)
        finally:
            module.train(was_training)

    def codebook(self, trainer, module) -> None:
        """Usage numbers, the histogram and the code maps."""
        counts = self.usage(module.vae, trainer.val_dataloaders)
        metrics = {"codebook/perplexity": perplexity(counts),
                   "codebook/codes_in_use": float((counts > 0).sum())}
        step = logged_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        writer = tensorboard(trainer)
        if writer is not None:
            codes = torch.arange(len(counts)).repeat_interleave(counts.cpu())
            writer.add_histogram("codebook/usage", codes, step,
                                 bins=min(len(counts), 64))
        if loggers.takes_images(trainer.loggers):
            x, _ = self.fixed_batch(trainer, module)
            loggers.log_picture(trainer.loggers, self.tag,
                                pictures.code_grid(module.vae, x, self.nrow), step)

    @torch.no_grad()
    def usage(self, vae, batches) -> torch.Tensor:
        counts, seen = torch.zeros(vae.codebook_size, dtype=torch.long), 0
        for x, *_ in batches:
            x = x[: self.usage_images - seen].to(vae.device)
            counts += code_usage(vae.encode(x).codes, vae.codebook_size).cpu()
            seen += len(x)
            if seen >= self.usage_images:
                break
        if not seen:
            raise ValueError("the validation split is empty")
        return counts
