"""The VQ-VAE (van den Oord, Vinyals & Kavukcuoglu, 2017): the encoder's grid of vectors is
snapped to the nearest of K codebook vectors, and the decoder sees only those.

Through the model interface: `encode` gives a point mass on the grid's codes (`CodePointMass`:
its draws are the quantized vectors, with the straight-through gradient to the encoder),
`prior` a distribution over code grids (uniform before stage two; a gated PixelCNN after
`experiment=vqvae_prior`), and `kl` is -log p(codes), the KL of a point mass whose entropy is
zero. The bound log p(x | z_q) + log p(z_q) is then a true lower bound on log p(x) with a
discrete likelihood. The latent vector the rest of vaelab sees is the quantized grid, flattened
([D * h * w], channel first).

The codebook is vector-quantize-pytorch's `VectorQuantize` (EMA updates, k-means
initialization, restarts of dead codes from encoder outputs), not code of vaelab's own.
"""

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from vaelab.errors import BadValue
from vaelab.likelihoods import Likelihood
from vaelab.models.vae import VAE, conditional_classes


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the VQ-VAE paper's residual unit."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def grid_stages(size: int, largest: int) -> list[int]:
    """Sizes after each stride-2, 4x4 conv until the map is at most `largest` wide:
    28 -> [28, 14, 7], 32 -> [32, 16, 8], 64 -> [64, 32, 16, 8], 128 -> ... 8."""
    sizes = [size]
    while sizes[-1] > largest:
        sizes.append(sizes[-1] // 2)
    return sizes


class CodePointMass(Distribution):
    """q(z|x) of a VQ-VAE: all its mass on the quantized grid. Draws are the quantized vectors
    [..., D * h * w] (straight-through: the decoder's gradient reaches the encoder as if there
    were no snapping); `codes` [B, h, w] are the codebook indices; `commitment` the training
    loss that pulls encoder outputs to their codes."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True
    deterministic = True  # every draw is the same: evaluation needs one

    def __init__(self, quantized: torch.Tensor, codes: torch.Tensor, commitment: torch.Tensor):
        self.quantized, self.codes, self.commitment = quantized, codes, commitment
        super().__init__(batch_shape=quantized.shape[:1], event_shape=quantized.shape[1:],
                         validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self.quantized

    def rsample(self, sample_shape=()) -> torch.Tensor:
        return self.quantized.expand(*sample_shape, *self.quantized.shape)

    def sample(self, sample_shape=()) -> torch.Tensor:
        return self.rsample(sample_shape).detach()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """0 at the point (a probability of 1), -inf elsewhere."""
        same = (z == self.quantized).flatten(z.dim() - 1).all(-1)
        return torch.where(same, 0.0, -math.inf).to(z.dtype)


class CodeGridDistribution(Distribution):
    """A prior over code grids seen as latent vectors: `log_prob(z)` reads the codes of the
    quantized vectors z and scores them with `log_prob_codes`; `sample` draws codes with
    `sample_codes` and returns their vectors."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, vae: "VQVAE", log_prob_codes, sample_codes):
        self.vae, self.log_prob_codes, self.sample_codes = vae, log_prob_codes, sample_codes
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([vae.latent_dim]),
                         validate_args=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        codes = self.vae.codes_of(z.reshape(-1, z.shape[-1]))
        return self.log_prob_codes(codes).reshape(lead)

    def sample(self, sample_shape=()) -> torch.Tensor:
        n = math.prod(sample_shape)
        return self.vae.vectors_of(self.sample_codes(n)).reshape(*sample_shape, -1)


class UniformCodes(nn.Module):
    """p(codes) uniform over the K codes at every grid cell: the VQ-VAE before stage two, where
    -log p(codes) is the constant h * w * log K and samples look like noise."""

    closed_form_kl = False
    allows_context = True
    learned = False

    def __init__(self, codebook_size: int, grid: Sequence[int], num_classes: int | None = None):
        super().__init__()
        self.codebook_size, self.grid = codebook_size, tuple(grid)

    def log_prob_codes(self, codes: torch.Tensor, context=None) -> torch.Tensor:
        return codes.new_full(codes.shape[:1], -math.prod(self.grid) * math.log(
            self.codebook_size), dtype=torch.float32)

    def sample_codes(self, n: int, context=None, device=None) -> torch.Tensor:
        return torch.randint(self.codebook_size, (n, *self.grid), device=device)

    def forward(self, vae: "VQVAE", context=None) -> Distribution:
        return CodeGridDistribution(vae, self.log_prob_codes,
                                    lambda n: self.sample_codes(n, context, vae.device))


class VQVAE(VAE):
    """Encoder: stride-2 4x4 convs (widths `hidden` / 2 then `hidden`) down to a map of at most
    `grid` cells a side, `residual_blocks` residual units, a 1x1 conv to `latent_dim` (D) channels.
    Decoder: the mirror image, with transposed convs. `codebook_size` K codes of dimension D;
    `commitment` is beta of the paper's loss (0.25); `decay` the EMA's; a code unused for
    `dead_code_threshold` (expected count per batch below it) is restarted from an encoder
    output of the batch (0: never restart). `conditional_prior`: the stage-two prior is told
    the class of each image (labelled data), the autoencoder never is."""

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        likelihood: Likelihood,
        codebook_size: int = 512,
        hidden: int = 128,
        residual_blocks: int = 2,
        residual_hidden: int = 32,
        grid: int = 8,
        commitment: float = 0.25,
        decay: float = 0.99,
        kmeans_init: bool = True,
        dead_code_threshold: float = 2.0,
        conditional: bool = False,
        conditional_prior: bool = False,
        num_classes: int | None = None,
        prior=None,
    ):
        from vector_quantize_pytorch import VectorQuantize

        if len(data_shape) != 3:
            raise BadValue(f"model=vqvae needs images shaped [C, H, W], got {list(data_shape)}")
        if conditional:
            raise BadValue("model=vqvae's autoencoder takes no label; a class-conditional prior "
                           "comes with stage two (experiment=vqvae_prior)")
        c_in, height, width = data_shape
        hs, ws = grid_stages(height, grid), grid_stages(width, grid)
        if len(hs) != len(ws) or len(hs) < 2:
            raise BadValue(f"model=vqvae needs square-ish images larger than model.grid={grid}, "
                           f"got {height} x {width}")
        widths = [c_in] + [hidden // 2] * (len(hs) - 2) + [hidden]
        down: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            down += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.ReLU()]
        res = [ResidualBlock(hidden, residual_hidden) for _ in range(residual_blocks)]
        encoder = nn.Sequential(*down[:-1], *res, nn.ReLU(), nn.Conv2d(hidden, latent_dim, 1))
        up: list[nn.Module] = [nn.Conv2d(latent_dim, hidden, 3, padding=1),
                               *[ResidualBlock(hidden, residual_hidden)
                                 for _ in range(residual_blocks)]]
        rev = list(reversed(widths[1:]))
        out_channels = likelihood.param_shape(data_shape)[0]
        for i in range(len(hs) - 1):
            stage = len(hs) - 1 - i  # from size index `stage` back to `stage - 1`
            pad = (hs[stage - 1] - 2 * hs[stage], ws[stage - 1] - 2 * ws[stage])
            last = i == len(hs) - 2
            up += [nn.ReLU(), nn.ConvTranspose2d(rev[i], out_channels if last else rev[i + 1], 4,
                                                 stride=2, padding=1, output_padding=pad)]
        self.grid_shape = (hs[-1], ws[-1])
        super().__init__(encoder, nn.Sequential(*up), likelihood,
                         latent_dim * hs[-1] * ws[-1], data_shape)
        self.latent_channels, self.codebook_size = latent_dim, codebook_size
        self.quantizer = VectorQuantize(
            dim=latent_dim, codebook_size=codebook_size, decay=decay, kmeans_init=kmeans_init,
            threshold_ema_dead_code=dead_code_threshold, commitment_weight=0.0,
            accept_image_fmap=True)
        self.commitment = commitment
        # labels reach the prior only (the autoencoder never sees them)
        self.num_classes = conditional_classes(conditional_prior, num_classes)
        self.prior_net = (prior or UniformCodes)(codebook_size=codebook_size,
                                                 grid=self.grid_shape,
                                                 num_classes=self.num_classes)
        self.frozen = False

    # -- stage two ----------------------------------------------------------------------------
    def freeze_autoencoder(self) -> None:
        """Stage two: only the prior learns; the autoencoder and codebook stay as trained (in
        eval mode, so the EMA codebook does not move)."""
        self.frozen = True
        for name, parameter in self.named_parameters():
            if not name.startswith("prior_net."):
                parameter.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VQVAE":
        super().train(mode)
        if self.frozen:
            for name, child in self.named_children():
                if name != "prior_net":
                    child.eval()
        return self

    @contextlib.contextmanager
    def uniform_prior(self):
        """The uniform prior over codes for a while (its samples beside the learned prior's)."""
        learned = self.prior_net
        self.prior_net = UniformCodes(self.codebook_size, self.grid_shape)
        try:
            yield self
        finally:
            self.prior_net = learned

    # -- codes and vectors ----------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook  # [K, D]

    def codes_of(self, z: torch.Tensor) -> torch.Tensor:
        """The codes [N, h, w] of latent vectors [N, D * h * w] (quantized ones: exact)."""
        grid = z.reshape(len(z), self.latent_channels, -1).transpose(1, 2)  # [N, h*w, D]
        return torch.cdist(grid, self.codebook[None].to(grid)).argmin(-1).reshape(
            len(z), *self.grid_shape)

    def vectors_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Latent vectors [N, D * h * w] of codes [N, h, w]."""
        vectors = self.codebook.to(codes.device)[codes]  # [N, h, w, D]
        return vectors.permute(0, 3, 1, 2).reshape(len(codes), -1)

    # -- the model interface ---------------------------------------------------------------------
    def encode(self, x: torch.Tensor, context=None) -> CodePointMass:
        h = self.encoder(x).float()
        quantized, codes, _ = self.quantizer(h)
        # computed here rather than by the library, which reports it in training only
        commitment = self.commitment * (h - quantized.detach()).pow(2).mean()
        return CodePointMass(quantized.flatten(1), codes, commitment)

    def decode(self, z: torch.Tensor, context=None) -> Distribution:
        batch = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.latent_channels, *self.grid_shape))
        return self.likelihood(out.reshape(*batch, *self.likelihood.param_shape(self.data_shape)),
                               len(self.data_shape))

    def kl_per_dim(self, q):
        return None

    def kl(self, q: CodePointMass, z: torch.Tensor, context=None) -> torch.Tensor:
        """-log p(codes): the KL of a point mass (entropy 0) from the prior, at every draw."""
        nll = -self.prior_net.log_prob_codes(q.codes, context)
        return nll.expand(z.shape[:-1])

    def penalties(self, q: CodePointMass) -> dict[str, torch.Tensor]:
        """The commitment loss (beta ||z_e - sg(e)||^2, mean over the grid's values)."""
        return {} if self.frozen else {"commitment": q.commitment}

    @torch.no_grad()
    def prior_quantiles(self, levels: torch.Tensor, context=None, draws: int = 0) -> torch.Tensor:
        """Per-dimension quantiles of the codebook's values, each dimension's marginal under a
        uniform prior over codes (exact there; a learned prior's sampling would be slow)."""
        per_code = torch.quantile(self.codebook.float(), levels.to(self.device), dim=0)  # [L, D]
        cells = math.prod(self.grid_shape)
        return per_code[:, :, None].expand(-1, -1, cells).reshape(len(levels), -1)

    def pairwise_log_density(self, q, z):
        raise BadValue("model=vqvae's posterior is a point mass on codes; this objective needs a "
                       "Gaussian posterior (model=mlp or model=conv)")


def code_usage(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in `codes` (any shape): [K] counts."""
    return torch.bincount(codes.flatten().long(), minlength=codebook_size)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code usage: K when all codes are used equally, 1 for one code."""
    p = counts.double() / counts.sum().clamp_min(1)
    return math.exp(-(p * p.clamp_min(1e-30).log()).sum().item())

