"""What a VAE learned, as image grids and matplotlib figures.

Shared by the TensorBoard callbacks (during training) and `vaelab-generate` (afterwards), so a
picture in TensorBoard and its PNG are drawn by the same code. Everything goes through the VAE's
own `encode` / `decode` / `prior` / `sample_latents`. Labels are passed as the context of
conditional models and ignored otherwise.

Memory does not grow with how many images a picture shows: images are encoded and decoded CHUNK
at a time, a grid's tiles shrink so that it never holds more than GRID_PIXELS pixels, and the
pictures made from many images (scatter, projector, manifold frame) read them batch by batch and
keep only their latent means.
"""

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only, never a window

import math  # noqa: E402
from collections.abc import Iterable  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from vaelab.models.vae import VAE  # noqa: E402

SCATTER_METHODS = ("pca", "tsne")
MANIFOLD_FRAMES = ("prior", "posterior")
QUANTILES = (0.05, 0.95)  # the manifold's extent, as in Kingma & Welling's figure 4
CHUNK = 64  # images encoded or decoded at once
GRID_PIXELS = 2048 * 2048  # a grid's pixels at most (50 MB in RGB floats); 1x at the defaults


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] for display (a Gaussian mean can leave that range)."""
    return x.detach().float().clamp(0, 1).cpu()


def tile_size(count: int, shape) -> tuple[int, int]:
    """(height, width) of each of `count` tiles: the images' own size, shrunk where the tiles
    together would exceed GRID_PIXELS."""
    height, width = shape[-2:]
    scale = min(1.0, math.sqrt(GRID_PIXELS / (max(count, 1) * height * width)))
    return max(1, int(height * scale)), max(1, int(width * scale))


def fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Display images [N, C, H, W] at `size` (antialiased when shrunk)."""
    x = as_images(x)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True).clamp(0, 1)


def class_of(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels to colour by: a class per image, or the first factor of factor classes [N, F]
    (dSprites: the shape)."""
    return labels[:, 0] if labels is not None and labels.ndim == 2 else labels


def context_of(vae: VAE, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels as the model's context: kept for conditional models, dropped for the others."""
    if not vae.conditional:
        return None
    vae.check_context(labels)
    return labels.to(vae.device)


def chunks(*tensors: torch.Tensor | None):
    """The tensors' rows CHUNK at a time (None stays None)."""
    for start in range(0, len(tensors[0]), CHUNK):
        yield [None if t is None else t[start:start + CHUNK] for t in tensors]


@torch.no_grad()
def decode_means(vae: VAE, z: torch.Tensor, context: torch.Tensor | None = None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """Display images of p(x|z) means for latents [N, D], CHUNK at a time, at `size` (default:
    the tile size of N images)."""
    size = size or tile_size(len(z), vae.data_shape)
    return torch.cat([fit(vae.decode(zc.to(vae.device), c).mean, size)
                      for zc, c in chunks(z, context)])


@torch.no_grad()
def encode_means(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Posterior means [N, D] of images x, CHUNK at a time."""
    context = context_of(vae, labels)
    return torch.cat([vae.encode(xc.to(vae.device), c).mean for xc, c in chunks(x, context)])


@torch.no_grad()
def encode_stream(vae: VAE, batches: Iterable, n: int, thumbnails: bool = False):
    """(means [n, D], labels [n], thumbnails or None) of the first n images of `batches`, an
    iterable of (x, y) such as a DataLoader, read one batch at a time: only the means (and with
    `thumbnails`, the images shrunk so that all n fit in GRID_PIXELS) are kept."""
    means, labels, thumbs, seen = [], [], [], 0
    size = tile_size(n, vae.data_shape)
    for x, y, *_ in batches:
        x, y = x[: n - seen], y[: n - seen]
        means.append(encode_means(vae, x, y).cpu())
        labels.append(y.cpu())
        if thumbnails:
            thumbs += [fit(xc, size) for (xc,) in chunks(x)]
        seen += len(x)
        if seen >= n:
            break
    if not seen:
        raise ValueError("no images to encode (the split is empty)")
    return torch.cat(means), torch.cat(labels), torch.cat(thumbs) if thumbnails else None


@torch.no_grad()
def reconstruction_grid(vae: VAE, x: torch.Tensor, nrow: int = 8,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of `nrow` inputs, each row followed by their reconstructions (the likelihood mean)."""
    size = tile_size(2 * len(x), vae.data_shape)
    recon = decode_means(vae, encode_means(vae, x, labels), context_of(vae, labels), size)
    rows = []
    for start in range(0, len(x), nrow):
        rows += [fit(x[start:start + nrow], size), recon[start:start + nrow]]
    return make_grid(torch.cat(rows), nrow=nrow, pad_value=1)


@torch.no_grad()
def denoising_grid(vae: VAE, clean: torch.Tensor, noisy: torch.Tensor, nrow: int = 8,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of `nrow` noisy images, their reconstructions (the likelihood mean at the noisy
    image's posterior mean: the denoised image) and the clean images, in turn."""
    size = tile_size(3 * len(clean), vae.data_shape)
    denoised = decode_means(vae, encode_means(vae, noisy, labels), context_of(vae, labels), size)
    rows = []
    for start in range(0, len(clean), nrow):
        part = slice(start, start + nrow)
        rows += [fit(noisy[part], size), denoised[part], fit(clean[part], size)]
    return make_grid(torch.cat(rows), nrow=nrow, pad_value=1)


def sample_labels(vae: VAE, n: int, nrow: int, label: int | None = None) -> torch.Tensor | None:
    """The labels of a samples picture: none for an unconditional model; one row of `nrow` per
    class, or n of one `label`, for a conditional one."""
    if not vae.conditional:
        return None
    if label is not None:
        return torch.full((n,), int(label))
    return torch.arange(vae.num_classes).repeat_interleave(nrow)


@torch.no_grad()
def sample_grid(vae: VAE, n: int = 64, nrow: int = 8, seed: int = 0,
                label: int | None = None) -> torch.Tensor:
    """Decodings of prior draws z ~ p(z) from a seeded generator: the same z every epoch, so
    epochs compare. A conditional model gets one row per class (or all of `label`)."""
    labels = sample_labels(vae, n, nrow, label)
    context = context_of(vae, labels)
    n = n if context is None else len(context)
    z = vae.sample_latents(n, context, generator=torch.Generator().manual_seed(seed))
    return make_grid(decode_means(vae, z, context), nrow=nrow, pad_value=1)


@torch.no_grad()
def code_grid(vae: VAE, x: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Rows of `nrow` images, each row followed by their code maps (a model with discrete codes:
    each code its own colour, the same colour for the same code in every image)."""
    size = tile_size(2 * len(x), vae.data_shape)
    palette = torch.rand(vae.codebook_size, 3, generator=torch.Generator().manual_seed(0))
    maps = torch.cat([palette[vae.encode(xc.to(vae.device)).codes.cpu()].permute(0, 3, 1, 2)
                      for (xc,) in chunks(x)])
    maps = F.interpolate(maps, size=size, mode="nearest")
    images = fit(x, size).expand(-1, 3, -1, -1)
    rows = []
    for start in range(0, len(x), nrow):
        rows += [images[start:start + nrow], maps[start:start + nrow]]
    return make_grid(torch.cat(rows), nrow=nrow, pad_value=1)


def most_active_dims(means: torch.Tensor, k: int = 2) -> list[int]:
    """The k latent units whose posterior mean varies most over the images whose posterior means
    are `means` [N, D] (Burda et al.'s activity)."""
    activity = means.float().var(0)
    return activity.topk(min(k, means.shape[1])).indices.sort().values.tolist()


def manifold_dims(vae: VAE, means: torch.Tensor) -> tuple[int, int]:
    """The two latent dims to walk: both when there are two, else the two most active over the
    images whose posterior means are `means`."""
    if vae.latent_dim <= 2:
        return (0, vae.latent_dim - 1)
    if len(means) < 2:  # no variance to rank by
        return (0, 1)
    first, second = most_active_dims(means)
    return first, second


@torch.no_grad()
def manifold_axes(vae: VAE, dims: tuple[int, int], n: int = 20, frame: str = "prior",
                  means: torch.Tensor | None = None,
                  label: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(column values [n], row values [n], the latent point [D] the other dims sit at).

    `prior`: the grid covers the prior's 5%..95% quantiles in each walked dim (Kingma & Welling:
    equal probability mass between columns; the model computes them, exactly for N(0, I)), the
    other dims at the prior's median (a conditional model's, for `label`). `posterior`: the same
    quantiles of the posterior means `means` [N, D] (the aggregate posterior's range), the other
    dims at their median."""
    if frame not in MANIFOLD_FRAMES:
        raise ValueError(f"manifold frame {frame!r} is unknown; choose one of {MANIFOLD_FRAMES}")
    levels = torch.cat([torch.linspace(*QUANTILES, n), torch.tensor([0.5])]).to(vae.device)
    if frame == "posterior":
        if means is None or len(means) < 2:
            raise ValueError("the posterior frame needs at least 2 images")
        values = torch.quantile(means.float().to(levels.device), levels, dim=0)
    else:
        values = vae.prior_quantiles(levels, context_of(vae, None if label is None
                                                        else torch.tensor([label])))
    values = values.cpu()
    return values[:n, dims[0]], values[:n, dims[1]], values[n]


@torch.no_grad()
def manifold_images(vae: VAE, columns: torch.Tensor, rows: torch.Tensor, dims: tuple[int, int],
                    base: torch.Tensor | None = None, label: int | None = None) -> torch.Tensor:
    """[n*n, C, h, w] decodings of the grid columns x rows in latent dims `dims`, the others at
    `base` (default 0), as tiles of `tile_size`; row 0 is the top (largest second coordinate), as
    in the seeds' plot."""
    n = len(columns)
    z = torch.zeros(n, n, vae.latent_dim) if base is None else base.cpu().float().expand(
        n, n, vae.latent_dim).clone()
    z[..., dims[0]] = columns.float()[None, :]           # x-axis: left to right
    z[..., dims[1]] = rows.float().flip(0)[:, None]      # y-axis: top to bottom
    labels = sample_labels(vae, n * n, n, 0 if label is None else label)
    return decode_means(vae, z.reshape(n * n, -1), context_of(vae, labels))


def manifold_figure(images: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor,
                    dims: tuple[int, int], title: str = "") -> Figure:
    """The manifold grid with the latent value of every few columns and rows on the axes."""
    n = len(columns)
    grid = make_grid(images, nrow=n, padding=0)
    fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), extent=(0, n, 0, n),
              cmap="gray" if images.shape[1] == 1 else None)
    ticks = sorted({*range(0, n, max(1, n // 5)), n - 1})
    ax.set_xticks([i + 0.5 for i in ticks], [f"{columns[i]:.2f}" for i in ticks])
    ax.set_yticks([i + 0.5 for i in ticks], [f"{rows[i]:.2f}" for i in ticks])
    ax.set_xlabel(f"z[{dims[0]}]")
    ax.set_ylabel(f"z[{dims[1]}]")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def project_2d(points: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """Posterior means to 2-D for the scatter: as they are when 2-D, else PCA or t-SNE."""
    if method not in SCATTER_METHODS:
        raise ValueError(f"scatter method {method!r} is unknown; choose one of {SCATTER_METHODS}")
    points = points.float().cpu()
    if points.shape[1] <= 2:
        return points
    if method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(2, init="pca", random_state=seed, perplexity=min(30, len(points) - 1))
        return torch.from_numpy(tsne.fit_transform(points.numpy())).float()
    centred = points - points.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def scatter_figure(points: torch.Tensor, labels: torch.Tensor | None, title: str,
                   axis_names: tuple[str, str] = ("", "")) -> Figure:
    """2-D latent points coloured by label (one colour per class, with a legend)."""
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    else:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu(), cmap="tab10", s=3,
                             alpha=0.7)
        # plain-text labels: legend_elements' default ones are mathtext, whose parser took
        # 0.3 s of a 0.4 s picture; a fixed corner, as "best" searches the points for a spot
        handles, _ = scatter.legend_elements()
        classes = [str(int(c)) for c in labels.unique().sort().values]
        ax.legend(handles, classes[:len(handles)], title="label", loc="upper right", fontsize=8)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    fig.tight_layout()
    return fig


def latent_scatter(vae: VAE, means: torch.Tensor, labels: torch.Tensor | None,
                   method: str = "pca") -> Figure:
    """Posterior means [N, D] as points coloured by label (projected to 2-D above two dims)."""
    if vae.latent_dim == 1:
        means = torch.cat([means, torch.zeros_like(means)], -1)
        title, names = "posterior means (1-D)", ("z[0]", "")
    elif vae.latent_dim == 2:
        title, names = "posterior means", ("z[0]", "z[1]")
    else:
        title = f"posterior means, {vae.latent_dim}-D projected by {method.upper()}"
        prefix = "PC" if method == "pca" else "t-SNE"
        names = (f"{prefix} 1", f"{prefix} 2")
    return scatter_figure(project_2d(means, method), class_of(labels), title, names)


@torch.no_grad()
def interpolation_grid(vae: VAE, a: torch.Tensor, b: torch.Tensor, steps: int = 10,
                       labels_a: torch.Tensor | None = None,
                       labels_b: torch.Tensor | None = None) -> torch.Tensor:
    """One row per pair: a, decodings along the straight line between the latent means, b. A
    conditional model's one-hot label moves along the same line."""
    pairs = min(len(a), len(b))  # an odd number of images leaves the last one out
    a, b = a[:pairs], b[:pairs]
    labels_a = None if labels_a is None else labels_a[:pairs]
    labels_b = None if labels_b is None else labels_b[:pairs]
    za, zb = encode_means(vae, a, labels_a), encode_means(vae, b, labels_b)
    size = tile_size(pairs * (steps + 2), vae.data_shape)
    t = torch.linspace(0, 1, steps, device=za.device)[None, :, None]
    z = za[:, None] + t * (zb - za)[:, None]  # [pairs, steps, latent]
    context = None
    if vae.conditional:
        ha, hb = (vae.one_hot(context_of(vae, y)) for y in (labels_a, labels_b))
        context = (ha[:, None] + t * (hb - ha)[:, None]).flatten(0, 1)
    decoded = decode_means(vae, z.flatten(0, 1), context, size).unflatten(0, (pairs, steps))
    rows = torch.cat([fit(a, size)[:, None], decoded, fit(b, size)[:, None]], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=steps + 2, pad_value=1)


@torch.no_grad()
def dimension_order(vae: VAE, batches: Iterable) -> tuple[list[int], torch.Tensor, str]:
    """Latent dims by decreasing mean KL(q(z_d|x) || p(z_d)) over the images of `batches`
    ((x, labels) pairs, labels None for an unconditional model), with those KLs and the word for
    them; a model without a per-dimension KL (a VampPrior) is ranked by the variance of its
    posterior means instead (`activity`)."""
    kls, means = [], []
    for x, labels, *_ in batches:
        context = context_of(vae, labels)
        for xc, c in chunks(x, context):
            q = vae.encode(xc.to(vae.device), c)
            per_dim = vae.kl_per_dim(q)
            (means if per_dim is None else kls).append(
                (q.mean if per_dim is None else per_dim).float().cpu())
    if kls:
        values, word = torch.cat(kls).mean(0), "KL"
    else:
        values, word = torch.cat(means).var(0), "activity"
    return values.argsort(descending=True).tolist(), values, word


@torch.no_grad()
def traversal_images(vae: VAE, reference: torch.Tensor, dims: list[int], steps: int = 10,
                     span: float = 3.0, label: torch.Tensor | None = None) -> torch.Tensor:
    """[len(dims), steps, C, h, w]: for each dim, decodings with that dim swept over
    [-span, span] and the others at the reference image's posterior mean."""
    base = encode_means(vae, reference[None], None if label is None else label[None])[0].cpu()
    values = torch.linspace(-span, span, steps)
    z = base.float().expand(len(dims), steps, vae.latent_dim).clone()
    for row, d in enumerate(dims):
        z[row, :, d] = values
    context = None if label is None else context_of(vae, label.expand(len(dims) * steps))
    images = decode_means(vae, z.flatten(0, 1), context)
    return images.unflatten(0, (len(dims), steps))


def traversal_figure(images: torch.Tensor, dims: list[int], values: torch.Tensor, word: str,
                     span: float) -> Figure:
    """The traversal rows, each labelled with its dimension and its KL (or activity)."""
    rows, steps = images.shape[:2]
    grid = make_grid(images.flatten(0, 1), nrow=steps, padding=1, pad_value=1)
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.7 * rows + 0.8)), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if images.shape[2] == 1 else None,
              extent=(0, steps, rows, 0))
    ax.set_yticks([r + 0.5 for r in range(rows)],
                  [f"z[{d}] {word} {values[d]:.2f}" for d in dims])
    ax.set_xticks([0.5, steps / 2, steps - 0.5], [f"{-span:g}", "0", f"{span:g}"])
    ax.set_title(f"latent traversals, rows by {word}")
    fig.tight_layout()
    return fig


def traversal_frames(images: torch.Tensor) -> list:
    """Animated-GIF frames (PIL images): frame t shows every traversed dim at its t-th value,
    there and back."""
    from torchvision.transforms.functional import to_pil_image

    steps = images.shape[1]
    order = [*range(steps), *range(steps - 2, 0, -1)]
    return [to_pil_image(make_grid(images[:, t], nrow=len(images), pad_value=1)) for t in order]
