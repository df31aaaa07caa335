"""Pictures every N epochs, on a fixed validation batch and fixed noise so that epochs compare,
for every logger that takes images (TensorBoard, MLflow, W&B; see vaelab.loggers). Rank zero
only; a run without such a logger draws none. A picture that cannot be drawn is a warning, never
the end of the run."""

import logging

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from vaelab import loggers, pictures
from vaelab.models.vae import VAE

log = logging.getLogger(__name__)


def tensorboard(trainer: L.Trainer):
    """The SummaryWriter of the run's TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def due(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """After the validation of every `every_n_epochs`-th epoch and of the last one, the epoch
    `trainer.max_epochs` names (-1, a run bounded by its time or steps, names none)."""
    epoch = trainer.current_epoch + 1
    last = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch
    return not trainer.sanity_checking and (epoch % every_n_epochs == 0 or last)


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning logs an epoch's validation metrics at (the epoch's last optimizer step),
    so that pictures line up with them and survive a resume from that epoch's checkpoint, whose
    TensorBoard `purge_step` hides only what came after it."""
    return max(trainer.global_step - 1, 0)


class Picture(L.Callback):
    """Base: draws after validation every `every_n_epochs` epochs (and after the last one)."""

    tag = "pictures/picture"

    def __init__(self, every_n_epochs: int = 1, n_images: int = 64, seed: int = 0):
        self.every_n_epochs, self.n_images, self.seed = every_n_epochs, n_images, seed
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def fixed_batch(self, trainer: L.Trainer, module: L.LightningModule):
        """The first `n_images` validation images and labels (the val loader is not shuffled),
        kept: for pictures of a few images (see `val_means` for many)."""
        if self._batch is None:
            xs, ys, n = [], [], 0
            for x, y, *_ in trainer.val_dataloaders:
                xs.append(x.cpu()), ys.append(y.cpu())
                n += len(x)
                if n >= self.n_images:
                    break
            if not xs:
                raise ValueError("the validation split is empty")
            self._batch = torch.cat(xs)[: self.n_images], torch.cat(ys)[: self.n_images]
        x, y = self._batch
        return x.to(module.device), y.to(module.device)

    def val_means(self, trainer: L.Trainer, vae: VAE, thumbnails: bool = False):
        """Posterior means, labels (and thumbnails) of the first `n_images` validation images,
        read batch by batch: memory does not grow with `n_images`."""
        return pictures.encode_stream(vae, trainer.val_dataloaders, self.n_images, thumbnails)

    def due(self, trainer: L.Trainer) -> bool:
        return due(trainer, self.every_n_epochs)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, module):
        if self.due(trainer):
            self.draw_now(trainer, module)

    def draw_now(self, trainer, module):
        if not loggers.takes_images(trainer.loggers):
            return
        was_training = module.training
        module.eval()
        try:
            picture = self.draw(module.vae, trainer, module)
            if picture is not None:
                loggers.log_picture(trainer.loggers, self.tag, picture, logged_step(trainer))
        except Exception as err:  # noqa: BLE001 - a picture must never cost a run
            log.warning("%s skipped at step %d: %s: %s", self.tag, trainer.global_step,
                        type(err).__name__, err)
        finally:
            module.train(was_training)

    def draw(self, vae: VAE, trainer, module):
        """The picture: an image tensor [C, H, W] or a matplotlib figure (None: logged
        already)."""
        raise NotImplementedError


class Reconstructions(Picture):
    """Validation inputs above their reconstructions."""

    tag = "pictures/reconstructions"

    def __init__(self, nrow: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.nrow = nrow

    def draw(self, vae, trainer, module):
        x, y = self.fixed_batch(trainer, module)
        return pictures.reconstruction_grid(vae, x, self.nrow, y)


class PriorSamples(Picture):
    """Decodings of the same prior draws at every epoch (a conditional model: one row of `nrow`
    per class)."""

    tag = "pictures/samples"

    def __init__(self, nrow: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.nrow = nrow

    def draw(self, vae, trainer, module):
        return pictures.sample_grid(vae, self.n_images, self.nrow, self.seed)


class LatentManifold(Picture):
    """An n x n grid of decodings over the prior's 5%..95% quantiles (`frame: prior`) or the
    validation posterior means' (`frame: posterior`), in the two latent dims (or the two most
    active ones, the others at the median), with the latent values on the axes. A conditional
    model draws it for the first validation image's class."""

    tag = "pictures/manifold"

    def __init__(self, n: int = 20, frame: str = "prior", **kwargs):
        super().__init__(**kwargs)
        self.n, self.frame = n, frame

    def draw(self, vae, trainer, module):
        means, y, _ = self.val_means(trainer, vae)
        dims = pictures.manifold_dims(vae, means)
        label = int(y[0]) if vae.conditional else None
        columns, rows, base = pictures.manifold_axes(vae, dims, self.n, self.frame, means, label)
        images = pictures.manifold_images(vae, columns, rows, dims, base, label)
        title = f"{self.frame} 5%-95% quantiles" + (f", class {label}" if vae.conditional else "")
        return pictures.manifold_figure(images, columns, rows, dims, title)


class LatentScatter(Picture):
    """Posterior means of validation images coloured by label (PCA / t-SNE above 2-D)."""

    tag = "pictures/latent_scatter"

    def __init__(self, method: str = "pca", n_images: int = 2000, **kwargs):
        super().__init__(n_images=n_images, **kwargs)
        pictures.project_2d(torch.zeros(1, 1), method)  # an unknown method fails at start
        self.method = method

    def draw(self, vae, trainer, module):
        means, y, _ = self.val_means(trainer, vae)
        return pictures.latent_scatter(vae, means, y, self.method)


class Interpolations(Picture):
    """Rows between the latent means of pairs of validation images (0-1, 2-3, ...)."""

    tag = "pictures/interpolations"

    def __init__(self, pairs: int = 8, steps: int = 9, **kwargs):
        super().__init__(n_images=2 * pairs, **kwargs)
        self.steps = steps

    def draw(self, vae, trainer, module):
        x, y = self.fixed_batch(trainer, module)
        if len(x) < 2:
            raise ValueError("fewer than 2 validation images")
        return pictures.interpolation_grid(vae, x[0::2], x[1::2], self.steps, y[0::2], y[1::2])


class EmbeddingProjector(Picture):
    """At the end of fit: latent means with label metadata and image sprites for TensorBoard's
    projector (thumbnails, shrunk so that the sprite stays within pictures.GRID_PIXELS)."""

    tag = "latent_means"

    def __init__(self, n_images: int = 1000, **kwargs):
        super().__init__(n_images=n_images, **kwargs)

    def due(self, trainer):
        return False

    @rank_zero_only
    def on_fit_end(self, trainer, module):
        self.draw_now(trainer, module)

    def draw(self, vae, trainer, module):
        writer = tensorboard(trainer)
        if writer is None:  # TensorBoard's projector only
            return None
        means, y, thumbnails = self.val_means(trainer, vae, thumbnails=True)
        writer.add_embedding(means, metadata=pictures.class_of(y).tolist(), label_img=thumbnails,
                             global_step=logged_step(trainer), tag=self.tag)


class Traversals(Picture):
    """Each latent dim swept over [-span, span] from the first validation image's posterior mean,
    rows ordered by the dims' mean KL over `n_images` validation images and labelled with it
    (the `max_rows` dims with the most KL)."""

    tag = "pictures/traversals"

    def __init__(self, steps: int = 10, span: float = 3.0, max_rows: int = 16,
                 n_images: int = 64, **kwargs):
        super().__init__(n_images=n_images, **kwargs)
        self.steps, self.span, self.max_rows = steps, span, max_rows

    def draw(self, vae, trainer, module):
        x, y = self.fixed_batch(trainer, module)
        labels = y if vae.conditional else None
        order, values, word = pictures.dimension_order(vae, [(x, labels)])
        dims = order[: self.max_rows]
        images = pictures.traversal_images(vae, x[0], dims, self.steps, self.span,
                                           None if labels is None else labels[0])
        return pictures.traversal_figure(images, dims, values, word, self.span)
