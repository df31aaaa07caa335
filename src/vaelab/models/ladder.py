"""The ladder VAE (LVAE, Sønderby et al., 2016): L stochastic layers, generated top-down
p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1), and inferred along the same path.

A deterministic bottom-up pass gives each layer an estimate (mu_hat_i, var_hat_i) from x. The
top-down pass then draws z_L from its estimate and each lower z_i from the precision-weighted
merge of its estimate with the prior p(z_i | z_{i+1}) at the z_{i+1} just drawn:
var_q = 1 / (1 / var_hat + 1 / var_p), mu_q = var_q (mu_hat / var_hat + mu_p / var_p). Inference
and generation share the top-down nets, which keeps upper layers in use where a bottom-up
hierarchy lets them collapse.

The latent vector the rest of vaelab sees is [z_1, ..., z_L] (bottom first), so the objectives,
the importance-sampled NLL, every picture and `generate` work unchanged. The KL is the sum of
each layer's closed-form KL given the layer above's draw (the paper's estimator).
"""

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Distribution, Normal, constraints

from vaelab.errors import BadValue
from vaelab.likelihoods import Likelihood
from vaelab.models.priors import StandardNormal
from vaelab.models.vae import LOGVAR_RANGE, VAE, activation_class, normal_kl


def block(sizes: Sequence[int], act: type[nn.Module], batch_norm: bool) -> nn.Sequential:
    """Linear layers, each followed by batch norm (optional) and the activation."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), *([nn.BatchNorm1d(n_out)] if batch_norm else []),
                   act()]
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Features -> (mean, variance) of a diagonal Gaussian over `dim` units."""

    def __init__(self, n_in: int, dim: int):
        super().__init__()
        self.loc, self.log_var = nn.Linear(n_in, dim), nn.Linear(n_in, dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), self.log_var(h).clamp(*LOGVAR_RANGE).exp()


def merge(estimate: tuple[torch.Tensor, torch.Tensor], prior: Normal) -> Normal:
    """The precision-weighted combination of a bottom-up estimate and the top-down prior."""
    loc, var = estimate
    precision_q, precision_p = 1 / var, prior.scale.pow(-2)
    var_q = 1 / (precision_q + precision_p)
    return Normal(var_q * (loc * precision_q + prior.loc * precision_p), var_q.sqrt(),
                  validate_args=False)


class LadderDistribution(Distribution):
    """A top-down chain over [z_1, ..., z_L]: the top layer's own distribution, then each lower
    layer's given the draw above it: the prior p(z_i | z_{i+1}) (`prior_below(i, z_above)`),
    merged with the layer's bottom-up estimate where there are `estimates` (the posterior).
    Draws are ancestral and reparameterized; `layers(z)` gives every layer's distribution at a
    given z, from which log_prob, the KL and the per-layer numbers follow."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, top: Normal, prior_below, sizes: Sequence[int], estimates=None):
        self.top, self.prior_below, self.sizes = top, prior_below, list(sizes)
        self.estimates = estimates
        super().__init__(batch_shape=top.loc.shape[:-1], event_shape=torch.Size([sum(sizes)]),
                         validate_args=False)

    def below(self, i: int, z_above: torch.Tensor) -> Normal:
        return self.merged(i, z_above, self.prior_below(i, z_above))

    def merged(self, i: int, z_above: torch.Tensor, prior: Normal) -> Normal:
        """Layer i given the layer above: the prior itself, or its merge with the estimate."""
        if self.estimates is None:
            return prior
        loc, var = self.estimates[i]
        lead = z_above.shape[:-1]
        return merge((loc.expand(*lead, -1), var.expand(*lead, -1)), prior)

    def _descend(self, draw) -> torch.Tensor:
        """Top-down: `draw(distribution)` at each layer, the next one built at that draw."""
        zs = [draw(self.top)]
        for i in range(len(self.sizes) - 2, -1, -1):
            zs.insert(0, draw(self.below(i, zs[0])))
        return torch.cat(zs, -1)

    def rsample(self, sample_shape=()) -> torch.Tensor:
        return self._descend(lambda d: d.rsample(sample_shape) if d is self.top else d.rsample())

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    @property
    def mean(self) -> torch.Tensor:
        """The plug-in mean: each layer's mean given the mean of the layer above (what pictures
        and the active-unit count use as the posterior mean)."""
        return self._descend(lambda d: d.loc)

    def layers(self, z: torch.Tensor) -> list[Normal]:
        """Each layer's distribution (bottom first) at the layers above it in z."""
        return [q for q, _ in self.layer_pairs(z)]

    def layer_pairs(self, z: torch.Tensor) -> list[tuple[Normal, Normal | None]]:
        """(this chain's layer, the prior's layer) at z, bottom first, each prior computed once;
        the top's prior is None, N(0, I)."""
        parts = z.split(self.sizes, -1)
        pairs = []
        for i in range(len(self.sizes) - 1):
            prior = self.prior_below(i, parts[i + 1])
            pairs.append((self.merged(i, parts[i + 1], prior), prior))
        top = self.top
        if top.loc.shape != parts[-1].shape:
            top = Normal(top.loc.expand_as(parts[-1]), top.scale.expand_as(parts[-1]),
                         validate_args=False)
        return [*pairs, (top, None)]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        parts = z.split(self.sizes, -1)
        return sum(d.log_prob(p).sum(-1) for d, p in zip(self.layers(z), parts, strict=True))


class LadderVAE(VAE):
    """`latent_dims` are the stochastic layers below the top, bottom first; `latent_dim` is the
    top one. Each layer's bottom-up and top-down blocks have `depth` hidden layers of its
    `hidden_dims` width. The paper's MNIST model: hidden 512-256-128-64-32, latents
    64-32-16-8-4, batch norm, leaky ReLU."""

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        likelihood: Likelihood,
        latent_dims: Sequence[int] = (64, 32, 16, 8),
        hidden_dims: Sequence[int] = (512, 256, 128, 64, 32),
        depth: int = 2,
        activation: str = "leaky_relu",
        batch_norm: bool = True,
    ):
        sizes, hidden = [*latent_dims, latent_dim], list(hidden_dims)
        if len(hidden) != len(sizes):
            raise BadValue(f"model.hidden_dims needs one width per stochastic layer: "
                           f"{len(sizes)} layers (model.latent_dims {list(latent_dims)} and "
                           f"latent_dim {latent_dim}), got {hidden}")
        act = activation_class(activation)

        def stack(n_in: int, width: int) -> tuple[nn.Sequential, int]:
            """`depth` hidden layers of `width` after n_in inputs, and their output width."""
            return block([n_in] + [width] * depth, act, batch_norm), width if depth else n_in

        up, estimates, width = nn.ModuleList(), nn.ModuleList(), math.prod(data_shape)
        for h, size in zip(hidden, sizes, strict=True):
            net, width = stack(width, h)
            up.append(net)
            estimates.append(GaussianHead(width, size))
        # p(x | z_1) mirrors the bottom block; p(z_i | z_{i+1}) the block of layer i + 1
        net, width = stack(sizes[0], hidden[0])
        n_out = math.prod(likelihood.param_shape(data_shape))
        decoder = nn.Sequential(net, nn.Linear(width, n_out))
        super().__init__(nn.Flatten(), decoder, likelihood, sum(sizes), data_shape)
        self.sizes, self.up, self.estimates = sizes, up, estimates
        self.top_dim = latent_dim
        self.down = nn.ModuleList()
        for i in range(len(sizes) - 1):
            net, width = stack(sizes[i + 1], hidden[i + 1])
            self.down.append(nn.Sequential(net, GaussianHead(width, sizes[i])))
        self.prior_net = StandardNormal(latent_dim)  # p(z_L)

    def _down(self, i: int, z_above: torch.Tensor) -> Normal:
        """p(z_i | z_{i+1}), for draws with any leading dims (batch norm wants [N, features])."""
        loc, var = self.down[i](z_above.reshape(-1, z_above.shape[-1]))
        lead = z_above.shape[:-1]
        return Normal(loc.reshape(*lead, -1), var.sqrt().reshape(*lead, -1), validate_args=False)

    def encode(self, x: torch.Tensor, context=None) -> Distribution:
        h, estimates = self.encoder(x), []
        for up, head in zip(self.up, self.estimates, strict=True):
            h = up(h)
            estimates.append(head(h))
        top_loc, top_var = estimates[-1]
        return LadderDistribution(Normal(top_loc, top_var.sqrt(), validate_args=False),
                                  self._down, self.sizes, estimates)

    def prior(self, context=None) -> Distribution:
        zero = self.prior_net.loc
        top = Normal(zero, torch.ones_like(zero), validate_args=False)
        return LadderDistribution(top, self._down, self.sizes)

    def kl_per_dim(self, q):
        return None  # no closed form over the whole chain: `kl` sums the layers' given z

    @property
    def layer_sizes(self) -> list[int]:
        return list(self.sizes)

    def kl_layers(self, q: LadderDistribution, z: torch.Tensor, context=None
                  ) -> list[torch.Tensor]:
        """Each layer's KL(q(z_i | z_{i+1}, x) || p(z_i | z_{i+1})) at the draw z, bottom first:
        the closed form given the layer above, [*z.shape[:-1]] each (the top's against N(0, I)).
        The prior's nets run once per layer, shared with the posterior's merge."""
        return [normal_kl(qi, pi).sum(-1) for qi, pi in q.layer_pairs(z)]

    def kl(self, q, z, context=None) -> torch.Tensor:
        return sum(self.kl_layers(q, z))

    def decode(self, z, context=None) -> Distribution:
        return super().decode(z[..., :self.sizes[0]])

    def pairwise_log_density(self, q, z):
        raise BadValue("model=lvae's posterior does not factorize over latent dimensions; this "
                       "objective needs one that does (model=mlp or model=conv)")



class MapGaussianHead(nn.Module):
    """Feature maps [N, width, h, w] -> (mean, variance) of `channels` latents per cell,
    flattened [N, channels * h * w] as the ladder's layers are."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(width, 2 * channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_var = self.conv(h).chunk(2, 1)
        return loc.flatten(1), log_var.clamp(*LOGVAR_RANGE).exp().flatten(1)


class ResidualCell(nn.Module):
    """x + conv(act(bn(conv(act(bn(x)))))): NVAE's cell, without its squeeze-excitation."""

    def __init__(self, width: int, act: type[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(width), act(), nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width), act(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvLadderVAE(LadderVAE):
    """`model=lvae_conv`: the ladder on feature maps, for images (the idea of NVAE, Vahdat &
    Kautz, 2020, small enough for a CPU). Stride-2 convs bring the image down to the bottom
    layer's map (at most `bottom` cells a side); each layer above sits one stride-2 stage
    higher (64 px, bottom 16: maps of 16, 8 and 4). Layer i has `latent_channels[i]` latents
    per cell (the top one `latent_dim`); every stage has `width` channels and `cells` residual
    cells, bottom-up and top-down alike, except the decoder's stages above the bottom map,
    which halve it (down to 16) as convolutions at full size cost the most. The rest of the
    ladder (the precision-weighted merge, the KL per layer) is the MLP form's."""

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        likelihood: Likelihood,
        latent_channels: Sequence[int] = (8, 8),
        width: int = 64,
        bottom: int = 16,
        cells: int = 1,
        activation: str = "silu",
    ):
        if len(data_shape) != 3:
            raise BadValue(f"model=lvae_conv needs images shaped [C, H, W], got "
                           f"{list(data_shape)}")
        act = activation_class(activation)
        channels = [*latent_channels, latent_dim]
        stem, c_in, shapes = [], data_shape[0], [tuple(data_shape[1:])]
        while max(shapes[-1]) > bottom:  # stride-2 convs down to the bottom layer's map
            stem += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), act()]
            c_in = width
            shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
        stem += [nn.Conv2d(c_in, width, 3, padding=1), act()]
        below = len(shapes) - 1  # the stem's stages
        for _ in channels[1:]:
            shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
        maps = shapes[below:]  # each layer's (h, w), bottom first

        def cells_of() -> list[nn.Module]:
            return [ResidualCell(width, act) for _ in range(cells)]

        def rise(h: int, w: int, h_up: int, w_up: int, c_in: int = width,
                 c_out: int = width) -> nn.Module:
            """A stride-2 transposed conv from (h, w) to exactly (h_up, w_up)."""
            return nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1,
                                      output_padding=(h_up - 2 * h + 1, w_up - 2 * w + 1))

        up, estimates = nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(channels):
            down = [] if i == 0 else [nn.Conv2d(width, width, 3, stride=2, padding=1)]
            up.append(nn.Sequential(*down, *cells_of()))
            estimates.append(MapGaussianHead(width, c))
        # p(x | z_1): from the bottom layer's map back to the image, retracing the stem's sizes
        layers = [nn.Unflatten(1, (channels[0], *maps[0])),
                  nn.Conv2d(channels[0], width, 3, padding=1), *cells_of()]
        c = width  # halved at each stage above the bottom map (the full-size ones cost most)
        for k in range(below, 0, -1):
            layers += [rise(*shapes[k], *shapes[k - 1], c, max(c // 2, 16)), act()]
            c = max(c // 2, 16)
        decoder = nn.Sequential(*layers, nn.Conv2d(c, likelihood.param_shape(data_shape)[0],
                                                   3, padding=1))
        sizes = [c * h * w for c, (h, w) in zip(channels, maps, strict=True)]
        VAE.__init__(self, nn.Sequential(*stem), decoder, likelihood, sum(sizes), data_shape)
        self.sizes, self.up, self.estimates = sizes, up, estimates
        self.top_dim = latent_dim  # latents per cell of the top map
        self.down = nn.ModuleList()
        for i in range(len(channels) - 1):  # p(z_i | z_{i+1}): up one stage, then the cells
            (h, w), (h_up, w_up) = maps[i + 1], maps[i]
            self.down.append(nn.Sequential(
                nn.Unflatten(1, (channels[i + 1], h, w)),
                nn.Conv2d(channels[i + 1], width, 3, padding=1), act(), rise(h, w, h_up, w_up),
                *cells_of(), MapGaussianHead(width, channels[i])))
        self.prior_net = StandardNormal(sizes[-1])  # p(z_L)
