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


def flat(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A net over the last dimension, for inputs with any leading dims (draws x batch): batch
    norm wants [N, features]."""
    return net(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


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
        """p(z_i | z_{i+1})."""
        loc, var = self.down[i][1](flat(self.down[i][0], z_above))
        return Normal(loc, var.sqrt(), validate_args=False)

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

