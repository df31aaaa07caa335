"""The VAE: the one place that knows what its latent space is.

Objectives, evaluation, pictures and `generate` call only `encode`, `decode`, `prior`, `kl` and
`sample` (with an optional `context`: the batch's labels, which conditional models use and the
others ignore). A family builds its nets and hands them to `VAE`; a family with another posterior
or prior overrides the methods below, nothing outside this package changes.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vaelab.errors import BadValue
from vaelab.likelihoods import Likelihood
from vaelab.models.priors import LOG_SQRT_2PI, StandardNormal, UnitGaussian

# exp(-30/2) ~ 3e-7 and exp(20/2) ~ 2e4: wide enough for any useful posterior, narrow enough that
# std**2 and the KL stay finite in float32.
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian(Independent):
    """N(loc, diag(scale^2)) over the last dimension, which remembers the noise eps of its last
    draw z = loc + eps * scale. Its log density at that very z is then -eps^2/2 - log scale -
    log sqrt(2 pi): the same value, and the same gradient in loc and scale, as recomputing eps
    from z, with fewer passes to run and differentiate (the IWAE bound's log q(z|x) at its own
    draws; with UnitGaussian's prior, the batch-20 IWAE objective's forward and backward went
    from 2.45 to 2.25 ms). Only the partial derivative in z alone is not kept there;
    objectives differentiate through loc and scale."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__(Normal(loc, scale, validate_args=False), 1, validate_args=False)
        self._last_draw: tuple[torch.Tensor, torch.Tensor] | None = None

    def rsample(self, sample_shape=()) -> torch.Tensor:
        loc, scale = self.base_dist.loc, self.base_dist.scale
        eps = torch.randn(self._extended_shape(sample_shape), dtype=loc.dtype, device=loc.device)
        z = loc + eps * scale
        self._last_draw = (z, eps)
        return z

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        loc, scale = self.base_dist.loc, self.base_dist.scale
        if self._last_draw is not None and z is self._last_draw[0]:
            eps = self._last_draw[1]
        else:
            eps = (z - loc) / scale
        return (-0.5 * eps.pow(2) - scale.log() - LOG_SQRT_2PI).sum(-1)

    def expand(self, batch_shape, _instance=None) -> "DiagonalGaussian":
        shape = torch.Size(batch_shape) + self.event_shape
        base = self.base_dist
        return DiagonalGaussian(base.loc.expand(shape), base.scale.expand(shape))


def diagonal_gaussian(params: torch.Tensor) -> DiagonalGaussian:
    """A net's output [..., 2D] read as (mean, log variance): a diagonal Gaussian over D dims."""
    mu, logvar = params.chunk(2, dim=-1)
    return DiagonalGaussian(mu, (0.5 * logvar.clamp(*LOGVAR_RANGE)).exp())


def normal_kl(q: Normal, p: Normal | None = None) -> torch.Tensor:
    """KL(q || p) between Gaussians, elementwise, in closed form (p=None: N(0, 1), in fewer
    passes). The same formula as torch.distributions.kl_divergence, whose registry lookup would
    break torch.compile's graph."""
    if p is None:
        return 0.5 * (q.scale.pow(2) + q.loc.pow(2) - 1) - q.scale.log()
    var_ratio = (q.scale / p.scale).pow(2)
    mean_term = ((q.loc - p.loc) / p.scale).pow(2)
    return 0.5 * (var_ratio + mean_term - 1 - var_ratio.log())


def independent_normal(distribution: Distribution) -> Normal | None:
    """The Normal of each latent dimension where `distribution` (a q(z|x) or p(z)) is a diagonal
    Gaussian, else None (a mixture, a chain of layers): what a codec cuts into bins per
    dimension."""
    base = distribution.base_dist if isinstance(distribution, Independent) else distribution
    return base if isinstance(base, Normal) else None


def conditional_classes(conditional: bool, num_classes: int | None) -> int | None:
    """The class count a conditional model embeds (None: unconditional), checked."""
    if not conditional:
        return None
    if not num_classes or num_classes < 2:
        raise BadValue(f"model.conditional=true needs labelled data with at least 2 classes, "
                       f"got num_classes={num_classes} (an image folder's classes are its "
                       f"subfolders)")
    return int(num_classes)


class Conditioned(nn.Module):
    """An encoder that sees the context beside the image: `head(cat(features(x), context))`.
    With no context (an unconditional model) it is `head(features(x))`."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        return self.head(h if context is None else torch.cat([h, context.to(h.dtype)], -1))


class VAE(nn.Module):
    """A diagonal-Gaussian posterior, a pluggable prior (N(0, I) unless `prior` says otherwise),
    and, when `conditional`, a one-hot class label fed to the encoder and the decoder (a CVAE,
    Sohn et al., 2015). `encoder` maps x (and the one-hot context when conditional) to
    [mean, log variance]; `decoder` maps z (concatenated with the one-hot context when
    conditional) to the likelihood's parameters."""

    codebook_size: int | None = None  # discrete latents (VQ-VAE): the number of codes

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        latent_dim: int,
        data_shape: Sequence[int],
        prior=None,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim = latent_dim
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        # `prior` is a factory (a `_partial_` config) called with the latent and data shapes.
        self.prior_net = (prior or StandardNormal)(latent_dim=latent_dim,
                                                   data_shape=self.data_shape)
        if self.conditional and not self.prior_net.allows_context:
            raise BadValue(f"{type(self.prior_net).__name__} cannot be used with a conditional "
                           f"model; use the standard prior (model.prior=null)")

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- context -------------------------------------------------------------------------------
    def check_context(self, context: torch.Tensor | None) -> None:
        """A conditional model needs a class label in 0..num_classes-1 for every example."""
        if not self.conditional:
            return
        if context is None:
            raise BadValue(f"this model is conditional ({self.num_classes} classes): give a "
                           f"label (generate: label=3)")
        if not context.is_floating_point() and len(context) and (
                context.min() < 0 or context.max() >= self.num_classes):
            raise BadValue(
                f"a conditional model needs a class label in 0..{self.num_classes - 1} for "
                f"every image, got labels in {int(context.min())}..{int(context.max())}. Images "
                f"directly in an image folder have no class (label -1): put every image in a "
                f"class subfolder, or use an unconditional model.")

    def one_hot(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """Labels [B] as one-hot rows [B, num_classes]; float rows (soft labels, e.g. an
        interpolation between classes) pass through. None for unconditional models."""
        if not self.conditional:
            return None
        if context is None:
            self.check_context(context)
        if context.is_floating_point():
            return context
        return F.one_hot(context.long(), self.num_classes).float()

    # -- the latent space ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Distribution:
        """q(z|x): batch shape [B], event shape [latent_dim]."""
        c = self.one_hot(context)
        return diagonal_gaussian(self.encoder(x) if c is None else self.encoder(x, c))

    def decode(self, z: torch.Tensor, context: torch.Tensor | None = None) -> Distribution:
        """p(x|z) for latents [..., latent_dim] (context [B] broadcast over the leading draws);
        batch shape [...], event = one example."""
        batch = z.shape[:-1]
        c = self.one_hot(context)
        if c is not None:
            z = torch.cat([z, c.to(z.dtype).expand(*batch, c.shape[-1])], -1)
        out = self.decoder(z.reshape(-1, z.shape[-1]))
        return self.likelihood(out.reshape(*batch, *self.likelihood.param_shape(self.data_shape)),
                               len(self.data_shape))

    def prior(self, context: torch.Tensor | None = None) -> Distribution:
        """p(z), event shape [latent_dim]."""
        return self.prior_net(self, context)

    def kl_per_dim(self, q: Distribution) -> torch.Tensor | None:
        """KL(q || p) per latent dim [B, latent_dim] in closed form, or None where the prior has
        none (then only the Monte-Carlo `kl` exists)."""
        if not self.prior_net.closed_form_kl:
            return None
        p = self.prior()
        return normal_kl(q.base_dist, None if isinstance(p, UnitGaussian) else p.base_dist)

    def kl(self, q: Distribution, z: torch.Tensor,
           context: torch.Tensor | None = None) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per draw, shape z.shape[:-1]: exact where a closed form exists,
        else the Monte-Carlo estimate log q(z|x) - log p(z) from the same draws z."""
        per_dim = self.kl_per_dim(q)
        if per_dim is not None:
            return per_dim.sum(-1).expand(z.shape[:-1])
        return q.log_prob(z) - self.prior(context).log_prob(z)

    def penalties(self, q: Distribution) -> dict[str, torch.Tensor]:
        """Training terms of the family's own that every objective adds to its loss and logs by
        name (the VQ-VAE's commitment loss); none for a Gaussian posterior."""
        return {}

    @property
    def layer_sizes(self) -> list[int]:
        """The sizes of the latent vector's stochastic layers, bottom first: one layer here."""
        return [self.latent_dim]

    def kl_layers(self, q: Distribution, z: torch.Tensor,
                  context: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each stochastic layer's part of the KL at the draws z (bottom first), z.shape[:-1]
        each: where upper layers collapse in a hierarchy."""
        return [self.kl(q, z, context)]

    def pairwise_log_density(self, q: Distribution, z: torch.Tensor) -> torch.Tensor:
        """log q(z_i[d] | x_j) for one draw per input, z [M, D]: [M, M, D], each draw's every
        dimension under every input's posterior (what estimates of the aggregate posterior q(z)
        and its marginals need, e.g. the beta-TCVAE's total correlation)."""
        base = q.base_dist if isinstance(q, Independent) else q
        if not isinstance(base, Normal):
            raise BadValue(f"{type(self).__name__}'s posterior does not factorize over latent "
                           f"dimensions ({type(q).__name__}); this objective needs one that "
                           f"does (model=mlp or model=conv)")
        return base.log_prob(z[:, None, :])

    @torch.no_grad()
    def sample_latents(self, n: int, context: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws z ~ p(z) [n, latent_dim]; `generator` makes them repeatable (the same
        pictures every epoch) without touching the global RNG."""
        seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return self.prior(context).sample((n,))

    @torch.no_grad()
    def prior_quantiles(self, levels: torch.Tensor, context: torch.Tensor | None = None,
                        draws: int = 2_000) -> torch.Tensor:
        """Per-dimension quantiles of p(z) at `levels` [L]: [L, latent_dim]. Exact where the
        prior knows them (N(0, I)), else from `draws` seeded prior draws: enough to frame a
        picture's axes (the 5% quantile within about 0.05 sd), and cheap enough to redo every
        epoch where each draw runs a conv net (model=lvae_conv: 20,000 took 17 s)."""
        exact = getattr(self.prior_net, "quantiles", None)
        if exact is not None and type(self).prior is VAE.prior:  # not a family's own prior
            return exact(levels)
        z = self.sample_latents(draws, context, torch.Generator().manual_seed(0))
        return torch.quantile(z.float(), levels.to(z.device), dim=0)

    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean images of p(x|z) for n draws z ~ p(z). A conditional model needs `context`
        (n labels)."""
        if self.conditional:
            self.check_context(context)
            context = context.to(self.device)
        return self.decode(self.sample_latents(n, context, generator), context).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x|z) at the posterior mean of z: the usual reconstruction picture."""
        return self.decode(self.encode(x, context).mean, context).mean


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
        raise BadValue(f"model.activation={name!r} is unknown; choose one of {sorted(classes)}")
    return classes[name]
