"""`vaelab-generate run_dir=...`: PNG pictures from a trained run, drawn by `vaelab.pictures`.
torch and the run's code are imported once the config has passed, so that `--help` and a bad
value answer at once."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from vaelab import schema
from vaelab.cli import collector_paused, config_dir, reports_user_errors
from vaelab.errors import BadValue

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def read_image(path: str, shape) -> torch.Tensor:
    """An image file as the model's input: same channels and size, values in [0, 1]."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    channels, height, width = shape
    image = Image.open(path).convert("L" if channels == 1 else "RGB").resize((width, height))
    return pil_to_tensor(image).float() / 255


def generate(cfg: DictConfig) -> dict[str, Path]:
    schema.validate(cfg, schema.Generate)
    with collector_paused():
        import matplotlib.pyplot as plt
        import torch
        from torchvision.utils import save_image

        from vaelab import pictures, runs

    run, ckpt = runs.resolve(cfg.run_dir, cfg.ckpt_path)
    module, _ = runs.load_module(ckpt, cfg.device)
    vae, device = module.vae, module.device
    if cfg.label is not None:
        if not vae.conditional:
            raise BadValue("label= is for conditional models (model=cvae); this run's model "
                           "is unconditional")
        vae.check_context(torch.tensor([cfg.label]))
    out = Path(cfg.out_dir) if cfg.out_dir else run / "generated"
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    needs_data = bool(set(cfg.pictures) - {"samples", "uniform_samples"})
    coded = {"uniform_samples", "code_grids"} & set(cfg.pictures)
    if coded and not vae.codebook_size:
        raise BadValue(f"pictures={sorted(coded)} are for models with discrete codes "
                       f"(model=vqvae); this run's model has continuous latents")
    # corrupted as the denoising picture asks (the other pictures read only the clean images)
    run_cfg = runs.with_corruption(runs.run_config(run), cfg.denoising.corruption)
    dataset = runs.load_split(run_cfg, cfg.split) if needs_data else None
    written: dict[str, Path] = {}

    def save(name: str, picture) -> None:
        path = out / f"{name}.png"
        if isinstance(picture, torch.Tensor):
            save_image(picture, path)
        else:
            picture.savefig(path)
            plt.close(picture)
        written[name] = path
        log.info("wrote %s", path)

    if "samples" in cfg.pictures:
        save("samples", pictures.sample_grid(vae, cfg.samples.n, cfg.nrow, cfg.seed, cfg.label))
    if "uniform_samples" in cfg.pictures:  # what the codes decode to without a learned prior
        with vae.uniform_prior():
            save("uniform_samples",
                 pictures.sample_grid(vae, cfg.samples.n, cfg.nrow, cfg.seed, cfg.label))
    if "code_grids" in cfg.pictures:
        x, *_ = runs.take(dataset, range(min(cfg.reconstructions.n, len(dataset))))
        save("code_grids", pictures.code_grid(vae, x.to(device), cfg.nrow))
    if "reconstructions" in cfg.pictures:
        x, y, *_ = runs.take(dataset, range(min(cfg.reconstructions.n, len(dataset))))
        save("reconstructions", pictures.reconstruction_grid(vae, x.to(device), cfg.nrow, y))
    if "denoising" in cfg.pictures:
        batch = runs.take(dataset, range(min(cfg.denoising.n, len(dataset))))
        if len(batch) < 3:
            raise BadValue("pictures=[denoising] needs corrupted images: this run's data has no "
                           "data.corruption; give one, e.g. denoising.corruption.kind=gaussian")
        x, y, seen = batch
        save("denoising", pictures.denoising_grid(vae, x.to(device), seen.to(device), cfg.nrow, y))
    if "interpolation" in cfg.pictures:
        spec = cfg.interpolation
        if spec.images:
            a, b = (read_image(p, vae.data_shape)[None] for p in spec.images)
            ya = yb = None if cfg.label is None else torch.tensor([int(cfg.label)])
        else:
            pairs = torch.as_tensor(list(spec.indices))
            (a, ya, *_), (b, yb, *_) = (runs.take(dataset, pairs[:, 0]),
                                        runs.take(dataset, pairs[:, 1]))
        save("interpolation",
             pictures.interpolation_grid(vae, a.to(device), b.to(device), spec.steps, ya, yb))
    if "manifold" in cfg.pictures or "latent_scatter" in cfg.pictures:
        # a random sample of the split, read CHUNK images at a time: only the means are kept
        order = torch.randperm(len(dataset), generator=generator)[:cfg.latent_scatter.n]
        batches = (runs.take(dataset, rows) for rows in order.split(pictures.CHUNK))
        means, y, _ = pictures.encode_stream(vae, batches, len(order))
    if "manifold" in cfg.pictures:
        spec = cfg.manifold
        dims = tuple(spec.dims) if spec.dims is not None else pictures.manifold_dims(vae, means)
        label = (int(y[0]) if cfg.label is None else int(cfg.label)) if vae.conditional else None
        columns, rows, base = pictures.manifold_axes(vae, dims, spec.n, spec.frame, means, label)
        images = pictures.manifold_images(vae, columns, rows, dims, base, label)
        title = f"{spec.frame} 5%-95% quantiles" + ("" if label is None else f", class {label}")
        save("manifold", pictures.manifold_figure(images, columns, rows, dims, title))
    if "traversals" in cfg.pictures:
        spec = cfg.traversals
        def labelled(x, y, *_):  # a conditional model's context: the images' classes, or `label`
            if not vae.conditional:
                return x, None
            return x, y if cfg.label is None else torch.full_like(y, int(cfg.label))

        rows = torch.arange(min(spec.n, len(dataset)))
        order, values, word = pictures.dimension_order(
            vae, (labelled(*runs.take(dataset, part)) for part in rows.split(pictures.CHUNK)))
        dims = order[: spec.max_rows]
        reference, label = labelled(*runs.take(dataset, torch.tensor([spec.index])))
        images = pictures.traversal_images(vae, reference[0], dims, spec.steps, spec.span,
                                           None if label is None else label[0])
        save("traversals", pictures.traversal_figure(images, dims, values, word, spec.span))
        frames = pictures.traversal_frames(images)
        frames[0].save(out / "traversals.gif", save_all=True, append_images=frames[1:],
                       duration=120, loop=0)
        log.info("wrote %s", out / "traversals.gif")
    if "latent_scatter" in cfg.pictures:
        save("latent_scatter", pictures.latent_scatter(vae, means, y, cfg.latent_scatter.method))
    return written


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
