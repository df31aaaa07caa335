"""A gated PixelCNN (van den Oord et al., 2016) over a grid of discrete codes: the learned prior
of a VQ-VAE (stage two, `experiment=vqvae_prior`).

p(codes) = prod over cells in raster order of p(code_ij | codes before it, class). A vertical
stack sees the rows above, a horizontal stack the cells to the left in the same row; combined,
every cell sees all cells before it and none after (no blind spot). Class-conditional when
given the data's class count: the label's embedding biases every gate.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from vaelab.errors import BadValue
from vaelab.models.vq import CodeGridDistribution


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack. `first`: the horizontal stack
    must not see the cell itself (mask A), and has no residual connection."""

    def __init__(self, channels: int, kernel: int, first: bool, num_classes: int | None):
        super().__init__()
        half = kernel // 2
        self.first, self.half = first, half
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel),
                                  padding=(half, half))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half + 1), padding=(0, half))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.label = None if num_classes is None else nn.Embedding(num_classes, 2 * channels)
        if first:  # mask A: the cell's own column is cut from the horizontal kernel
            self.register_buffer("mask", torch.ones_like(self.horizontal.weight))
            self.mask[..., -1] = 0

    @staticmethod
    def gate(h: torch.Tensor) -> torch.Tensor:
        a, b = h.chunk(2, 1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: torch.Tensor, h: torch.Tensor, label: torch.Tensor | None):
        height, width = v.shape[-2:]
        v_out = self.vertical(v)[..., :height, :]  # row i sees rows <= i
        # shifted one row down before the horizontal stack sees it: rows < i only
        to_h = self.vertical_to_horizontal(F.pad(v_out, (0, 0, 1, 0))[..., :height, :])
        weight = self.horizontal.weight * self.mask if self.first else self.horizontal.weight
        h_out = F.conv2d(h, weight, self.horizontal.bias, padding=(0, self.half))[..., :width]
        bias = 0 if label is None else self.label(label)[:, :, None, None]
        v_next = self.gate(v_out + bias)
        h_next = self.out(self.gate(h_out + to_h + bias))
        return v_next, h_next if self.first else h + h_next


class GatedPixelCNN(nn.Module):
    """Codes [N, h, w] -> logits [N, K, h, w] of each cell given the cells before it."""

    def __init__(self, codebook_size: int, channels: int = 64, layers: int = 8,
                 kernel: int = 5, num_classes: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, i == 0, num_classes)
                                    for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, 4 * channels, 1), nn.ReLU(),
                                  nn.Conv2d(4 * channels, codebook_size, 1))

    def forward(self, codes: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, label)
        return self.head(h)


class PixelCNNPrior(nn.Module):
    """p(codes) by a gated PixelCNN: the VQ-VAE's learned prior (`model.prior` of
    `experiment=vqvae_prior`). Sampling runs the net once per grid cell."""

    closed_form_kl = False
    allows_context = True
    learned = True

    def __init__(self, codebook_size: int, grid: Sequence[int], num_classes: int | None = None,
                 channels: int = 64, layers: int = 8, kernel: int = 5):
        super().__init__()
        self.codebook_size, self.grid, self.num_classes = codebook_size, tuple(grid), num_classes
        self.net = GatedPixelCNN(codebook_size, channels, layers, kernel, num_classes)

    def label(self, context: torch.Tensor | None) -> torch.Tensor | None:
        if self.num_classes is None:
            return None
        if context is None:
            raise BadValue(f"this prior is class-conditional ({self.num_classes} classes): "
                             f"give a label (generate: label=3)")
        return context.long()

    def log_prob_codes(self, codes: torch.Tensor, context=None) -> torch.Tensor:
        """log p(codes) [N] for codes [N, h, w]."""
        logits = self.net(codes.long(), self.label(context))
        return -F.cross_entropy(logits, codes.long(), reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample_codes(self, n: int, context=None, device=None) -> torch.Tensor:
        """Cell by cell in raster order. A cell in row i sees no row below it, so the net runs
        on rows 0..i only (the same logits, half the work on average)."""
        label = self.label(context)
        codes = torch.zeros(n, *self.grid, dtype=torch.long, device=device)
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                logits = self.net(codes[:, :i + 1], label)[:, :, i, j]
                codes[:, i, j] = torch.multinomial(F.softmax(logits.float(), -1), 1)[:, 0]
        return codes

    def forward(self, vae, context=None) -> Distribution:
        return CodeGridDistribution(
            vae, lambda codes: self.log_prob_codes(codes, context),
            lambda n: self.sample_codes(n, context, vae.device))
