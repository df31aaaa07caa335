"""The VAE: an encoder to q(z|x), a decoder to p(x|z), a standard normal prior.

Every family (mlp, conv, ...) builds its two nets and hands them to `VAE`; everything else
(objectives, pictures, evaluation) talks to the uniform interface below.
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vaelab.likelihoods import Likelihood

# exp(-30/2) ~ 3e-7 and exp(20/2) ~ 2e4: wide enough for any useful posterior, narrow enough that
# std**2 and the KL stay finite in float32.
LOGVAR_RANGE = (-30.0, 20.0)


class VAE(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        latent_dim: int,
        data_shape: Sequence[int],
    ):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim = latent_dim
        self.data_shape = tuple(data_shape)
        self.register_buffer("prior_loc", torch.zeros(latent_dim))

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x), a diagonal Gaussian; batch shape [B], event shape [latent_dim]."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        std = (0.5 * logvar.clamp(*LOGVAR_RANGE)).exp()
        return Independent(Normal(mu, std, validate_args=False), 1)

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for latents of shape [..., latent_dim]; batch shape [...], event = one example."""
        batch = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.latent_dim)).reshape(*batch, *self.data_shape)
        return self.likelihood(out, len(self.data_shape))

    def prior(self) -> Distribution:
        return Independent(Normal(self.prior_loc, torch.ones_like(self.prior_loc),
                                  validate_args=False), 1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean images of p(x|z) for n draws z ~ N(0, I)."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.prior_loc.device)
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) at the posterior mean of z: the usual reconstruction picture."""
        return self.decode(self.encode(x).mean).mean


def mlp(sizes: Sequence[int], activation: type[nn.Module], last_activation: bool = False):
    """Linear layers of the given sizes with `activation` between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def activation_class(name: str) -> type[nn.Module]:
    """`relu`, `tanh`, `gelu`, ... by name: the config says which, torch.nn supplies it."""
    classes = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU,
               "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU, "softplus": nn.Softplus}
    if name not in classes:
        raise ValueError(f"model.activation={name!r} is unknown; choose one of {sorted(classes)}")
    return classes[name]
