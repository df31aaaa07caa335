"""What a VAE learned, as image grids and matplotlib figures.

Shared by the TensorBoard callbacks (during training) and `vaelab-generate` (afterwards), so a
picture in TensorBoard and its PNG are drawn by the same code. Everything goes through the VAE's
own `encode` / `decode`.
"""

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from vaelab.models.vae import VAE  # noqa: E402

SCATTER_METHODS = ("pca", "tsne")


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] for display (a Gaussian mean can leave that range)."""
    return x.detach().float().clamp(0, 1).cpu()


@torch.no_grad()
def reconstruction_grid(vae: VAE, x: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Rows of `nrow` inputs, each row followed by their reconstructions (the likelihood mean)."""
    recon = vae.reconstruct(x)
    rows = []
    for start in range(0, len(x), nrow):
        rows += [x[start:start + nrow], recon[start:start + nrow]]
    return make_grid(as_images(torch.cat(rows)), nrow=nrow, pad_value=1)


@torch.no_grad()
def sample_grid(vae: VAE, z: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Decodings of given prior draws z ~ N(0, I): fixed z make epochs comparable."""
    return make_grid(as_images(vae.decode(z.to(vae.prior_loc.device)).mean), nrow=nrow, pad_value=1)


@torch.no_grad()
def most_active_dims(vae: VAE, x: torch.Tensor, k: int = 2) -> list[int]:
    """The k latent units whose posterior mean varies most over x (Burda et al.'s activity)."""
    activity = vae.encode(x).mean.var(0)
    return activity.topk(min(k, vae.latent_dim)).indices.sort().values.tolist()


def manifold_dims(vae: VAE, x: torch.Tensor) -> tuple[int, int]:
    """The two latent dims to walk: both when there are two, else the two most active."""
    if vae.latent_dim <= 2:
        return (0, vae.latent_dim - 1)
    first, second = most_active_dims(vae, x)
    return first, second


@torch.no_grad()
def manifold_images(vae: VAE, n: int = 20, scale: float = 2.0,
                    dims: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """[n*n, C, H, W] decodings of an n x n grid over [-scale, scale]^2 in latent dims `dims`, the
    others at 0; row 0 is the top (largest second coordinate), as in the seeds' plot."""
    axis = torch.linspace(-scale, scale, n)
    z = torch.zeros(n, n, vae.latent_dim, device=vae.prior_loc.device)
    z[..., dims[0]] = axis.to(z.device)[None, :]          # x-axis: left to right
    z[..., dims[1]] = axis.flip(0).to(z.device)[:, None]  # y-axis: top to bottom
    return as_images(vae.decode(z.reshape(n * n, -1)).mean)


def manifold_figure(images: torch.Tensor, n: int, scale: float, dims: tuple[int, int]) -> Figure:
    """The manifold grid with its latent coordinates on the axes."""
    grid = make_grid(images, nrow=n, padding=0)
    fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), extent=(-scale, scale, -scale, scale),
              cmap="gray" if images.shape[1] == 1 else None)
    ax.set_xlabel(f"z[{dims[0]}]")
    ax.set_ylabel(f"z[{dims[1]}]")
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


def scatter_figure(points: torch.Tensor, labels: torch.Tensor | None, title: str) -> Figure:
    """2-D latent points coloured by label (one colour per class, with a legend)."""
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    else:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu(), cmap="tab10", s=3,
                             alpha=0.7)
        ax.legend(*scatter.legend_elements(), title="label", loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def latent_scatter(vae: VAE, x: torch.Tensor, labels: torch.Tensor | None,
                   method: str = "pca") -> Figure:
    means = vae.encode(x).mean
    if vae.latent_dim <= 2:
        title = "posterior means"
    else:
        title = f"posterior means, {vae.latent_dim}-D projected by {method.upper()}"
    return scatter_figure(project_2d(means, method), labels, title)


@torch.no_grad()
def interpolation_grid(vae: VAE, a: torch.Tensor, b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """One row per pair: a, decodings along the straight line between the latent means, b."""
    za, zb = vae.encode(a).mean, vae.encode(b).mean
    t = torch.linspace(0, 1, steps, device=za.device)[None, :, None]
    z = za[:, None] + t * (zb - za)[:, None]  # [pairs, steps, latent]
    decoded = vae.decode(z).mean  # [pairs, steps, C, H, W]
    rows = torch.cat([a[:, None], decoded, b[:, None]], dim=1)
    return make_grid(as_images(rows.flatten(0, 1)), nrow=steps + 2, pad_value=1)
