"""A VAE with two stochastic layers: the architecture of Burda et al. (2016), section 5.

Generative model p(z2) p(z1|z2) p(x|z1) with p(z2) = N(0, I); inference q(z1|x) q(z2|z1); each
conditional a diagonal Gaussian from a small MLP. The latent vector the rest of vaelab sees is
[z1, z2], so the objectives, the importance-sampled NLL, and every picture work unchanged: the KL
is the Monte-Carlo log q(z1, z2|x) - log p(z1, z2) from the same draws.
"""

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from vaelab.likelihoods import Likelihood
from vaelab.models.priors import StandardNormal
from vaelab.models.vae import VAE, activation_class, diagonal_gaussian, mlp


class Chain(Distribution):
    """p(a) p(b|a) over the concatenated vector: [a, b], or [b, a] when `a_last`.

    Draws are ancestral (a, then b given a) and reparameterized when both parts are; log_prob
    is log p(a) + log p(b|a)."""

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, first: Distribution, then: Callable[[torch.Tensor], Distribution],
                 first_dim: int, second_dim: int, a_last: bool = False):
        self.first, self.then, self.a_last = first, then, a_last
        self.sizes = (first_dim, second_dim)
        super().__init__(batch_shape=first.batch_shape,
                         event_shape=torch.Size([first_dim + second_dim]), validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self.first.has_rsample

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([b, a] if self.a_last else [a, b], -1)

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a_last:
            b, a = z.split(self.sizes[::-1], -1)
        else:
            a, b = z.split(self.sizes, -1)
        return a, b

    def rsample(self, sample_shape=()) -> torch.Tensor:
        a = self.first.rsample(sample_shape)
        return self._join(a, self.then(a).rsample())

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            a = self.first.sample(sample_shape)
            return self._join(a, self.then(a).sample())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        a, b = self._split(z)
        return self.first.log_prob(a) + self.then(a).log_prob(b)

    @property
    def mean(self) -> torch.Tensor:
        """The plug-in mean [E a, E[b | a = E a]] (exact for a; what pictures and the active-unit
        count use as the posterior mean)."""
        a = self.first.mean
        return self._join(a, self.then(a).mean)


class HierarchicalVAE(VAE):
    """Two stochastic layers: `latent_dim` units on top (z2) and `bottom_dim` below (z1).

    The IWAE paper's net (`experiment=hvae_mnist`): x -> 200 -> 200 -> z1 (100) -> 100 -> 100
    -> z2 (50) for inference, and z2 -> 100 -> 100 -> z1 -> 200 -> 200 -> x for generation, tanh.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        likelihood: Likelihood,
        bottom_dim: int = 100,
        hidden_dims: Sequence[int] = (200, 200),
        top_hidden_dims: Sequence[int] = (100, 100),
        activation: str = "tanh",
    ):
        act = activation_class(activation)
        n_in, hidden, top = math.prod(data_shape), list(hidden_dims), list(top_hidden_dims)
        encoder = nn.Sequential(nn.Flatten(), mlp([n_in, *hidden, 2 * bottom_dim], act))
        n_out = math.prod(likelihood.param_shape(data_shape))
        decoder = mlp([bottom_dim, *reversed(hidden), n_out], act)
        super().__init__(encoder, decoder, likelihood, bottom_dim + latent_dim, data_shape)
        self.bottom_dim, self.top_dim = bottom_dim, latent_dim
        self.encoder_top = mlp([bottom_dim, *top, 2 * latent_dim], act)  # q(z2|z1)
        self.decoder_top = mlp([latent_dim, *reversed(top), 2 * bottom_dim], act)  # p(z1|z2)
        self.prior_net = StandardNormal(latent_dim)  # p(z2)

    def kl_per_dim(self, q):
        return None  # the pair's KL has no closed form: `kl` estimates it from the draws

    def encode(self, x, context=None) -> Distribution:
        q1 = diagonal_gaussian(self.encoder(x))
        return Chain(q1, lambda z1: diagonal_gaussian(self.encoder_top(z1)),
                     self.bottom_dim, self.top_dim)

    def prior(self, context=None) -> Distribution:
        return Chain(self.prior_net(self), lambda z2: diagonal_gaussian(self.decoder_top(z2)),
                     self.top_dim, self.bottom_dim, a_last=True)

    def decode(self, z, context=None) -> Distribution:
        return super().decode(z[..., :self.bottom_dim])

    @property
    def layer_sizes(self) -> list[int]:
        return [self.bottom_dim, self.top_dim]

    def kl_layers(self, q: Chain, z: torch.Tensor, context=None) -> list[torch.Tensor]:
        """Each layer's part of the Monte-Carlo KL at the draws z = [z1, z2], bottom first:
        log q(z1|x) - log p(z1|z2) and log q(z2|z1) - log p(z2); they sum to `kl`."""
        z1, z2 = z.split(self.layer_sizes, -1)
        p1 = diagonal_gaussian(self.decoder_top(z2))
        return [q.first.log_prob(z1) - p1.log_prob(z1),
                q.then(z1).log_prob(z2) - self.prior_net(self).log_prob(z2)]
