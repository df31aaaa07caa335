"""Observation models p(x|z): turn a decoder's raw output into a distribution over one example.

Every likelihood returns a distribution whose event is the whole example, so `log_prob(x)` is
already summed over the example's dimensions (nats per example). A likelihood also says how many
decoder outputs it needs (`param_shape`): one per data value for a shared scale, two for a
per-pixel scale, ten per component for a logistic mixture over RGB.

The discrete ones give the probability of each of the 256 values of an 8-bit image (data scaled
to [0, 1], value k stored as k / 255): bits/dim is then exactly -log2 p(x) / D.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal, constraints

from vaelab.errors import BadValue

LEVELS = 256                  # values of an 8-bit channel
HALF_BIN = 0.5 / (LEVELS - 1)  # half the width of a value's bin on the [0, 1] scale


class Likelihood(nn.Module):
    """Base class: the decoder's raw output [..., *param_shape] parameterizes p(x|z).

    `discrete`: a probability of each value (bits/dim reads it as is) rather than a density
    over [0, 1]-scaled 8-bit values (bits/dim adds the bin width)."""

    discrete = False
    levels = LEVELS  # the values of one data value, where `discrete` (what a codec codes)

    def param_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """The decoder's output shape for one example: one value per data value by default. A
        likelihood with a net of its own builds it for `data_shape` here (every family asks
        before it builds its decoder)."""
        return tuple(data_shape)

    def coded_per_step(self, data_shape: Sequence[int]) -> int:
        """The most values of one example that one step of a codec's coding order covers."""
        return math.prod(data_shape)

    def forward(self, out: torch.Tensor, event_ndims: int) -> Distribution:
        raise NotImplementedError


def per_channel(data_shape: Sequence[int], n: int) -> tuple[int, ...]:
    """`n` outputs per data value, stacked along the channel (first) dimension."""
    return (n * data_shape[0], *data_shape[1:])


class BernoulliLikelihood(Likelihood):
    """Bernoulli with logits; the usual choice for MNIST-like data in [0, 1].

    Non-binarized intensities are accepted as targets (the cross-entropy of pytorch/examples),
    hence `validate_args=False`.
    """

    discrete = True
    levels = 2

    def forward(self, out, event_ndims):
        return IndependentBernoulli(out, event_ndims)


class IndependentBernoulli(Independent):
    """Independent Bernoulli whose log_prob sums the cross-entropy before negating it. The
    same numbers as torch's, which negate every value first: one full-size negation fewer
    forward and backward, 1.2 ms of a 7.7 ms batch-100 IWAE objective step on MNIST."""

    def __init__(self, logits: torch.Tensor, event_ndims: int):
        super().__init__(Bernoulli(logits=logits, validate_args=False), event_ndims,
                         validate_args=False)
        self.logits = logits

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return IndependentBernoulli(self.logits.expand(shape), self.reinterpreted_batch_ndims)

    def coding_steps(self) -> list[tuple]:
        """One step: the values are independent given z."""
        return [()]

    def table(self, value: torch.Tensor, step: tuple = ()) -> torch.Tensor:
        """P(0) and P(1) of every value [..., *event, 2]; they are independent, so `value` does
        not matter."""
        return torch.stack([torch.sigmoid(-self.logits), torch.sigmoid(self.logits)], -1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits, value = torch.broadcast_tensors(self.logits, value)
        event_dims = tuple(range(-self.reinterpreted_batch_ndims, 0))
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(event_dims)


class GaussianLikelihood(Likelihood):
    """Gaussian with a mean from the decoder and a standard deviation that is either one for all
    values (`scale=global`, learned by maximum likelihood: the "sigma-VAE") or predicted for
    each value by the decoder (`scale=pixel`: the white background gets little noise, the
    edges more). `discretized=true` turns the density into the probability of each 8-bit
    value's bin, so bits/dim is exact.

    `learn_scale=False` with `init_scale=sqrt(1/2)` and a global scale is the MSE loss up to a
    constant. A number as `scale` (checkpoints before `init_scale`) is a global scale that
    starts there.
    """

    def __init__(self, scale: str | float = "global", init_scale: float = 0.3,
                 learn_scale: bool = True, min_scale: float = 1e-3, discretized: bool = False):
        super().__init__()
        if not isinstance(scale, str):
            scale, init_scale = "global", float(scale)
        if scale not in ("global", "pixel"):
            raise BadValue(f"likelihood.scale={scale!r} is unknown; choose global (one learned "
                           f"sigma) or pixel (a sigma per value, from the decoder)")
        self.per_pixel, self.discrete = scale == "pixel", bool(discretized)
        self.min_scale = min_scale
        log_scale = torch.tensor(math.log(init_scale))
        if learn_scale and not self.per_pixel:
            self.log_scale = nn.Parameter(log_scale)
        else:  # the per-pixel decoder's log scales are offsets from this one
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp_min(self.min_scale)

    def param_shape(self, data_shape):
        return per_channel(data_shape, 2) if self.per_pixel else tuple(data_shape)

    def forward(self, out, event_ndims):
        if self.per_pixel:
            loc, raw = out.chunk(2, dim=-event_ndims)
            scale = (raw + self.log_scale).exp().clamp_min(self.min_scale)
        else:
            loc, scale = out, self.scale.to(out.dtype).expand_as(out)
        if self.discrete:
            return DiscretizedGaussian(loc, scale, event_ndims)
        return Independent(Normal(loc, scale, validate_args=False), event_ndims)


def bins(value: torch.Tensor) -> torch.Tensor:
    """[0, 1]-scaled 8-bit values -> their integer values 0..255 (as floats)."""
    return (value * (LEVELS - 1)).round().clamp(0, LEVELS - 1)


def log_bin_mass(log_cdf_upper: torch.Tensor, log_sf_lower: torch.Tensor,
                 log_inner: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log P(value k): the lowest bin reaches down to -inf, the highest up to +inf, the others
    are the inner mass. Every branch is finite, so no NaN reaches a gradient."""
    return torch.where(k == 0, log_cdf_upper,
                       torch.where(k == LEVELS - 1, log_sf_lower, log_inner))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it. Each branch sees only inputs
    from its own side, so the one not taken has no infinite gradient to turn into NaN."""
    near = x > -math.log(2)
    x = x.clamp_max(-1e-30)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -math.log(2)))),
                       torch.log1p(-torch.exp(torch.where(near, -math.log(2), x))))


def bin_masses(t: torch.Tensor, cdf) -> torch.Tensor:
    """The mass between consecutive standardized bin edges t [..., n + 1] (increasing) of a
    distribution symmetric about 0 with `cdf`: [..., n]. Each comes from the smaller tail at its
    edges, so neither side of the mean loses its precision to 1 - cdf."""
    tail = cdf(-t.abs())
    below, above = t[..., 1:] <= 0, t[..., :-1] > 0
    between = tail[..., :-1] - tail[..., 1:]  # both edges above the mean; minus it: both below
    return torch.where(above, between, torch.where(below, -between,
                                                   1 - tail[..., :-1] - tail[..., 1:]))


class DiscreteImage(Distribution):
    """Shared by the discrete 8-bit image distributions: batch shape and event of one example,
    log_prob summed over the event, samples on the 8-bit grid."""

    arg_constraints: dict = {}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, batch_shape, event_shape):
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=False)

    def log_prob_per_value(self, value: torch.Tensor) -> torch.Tensor:
        """log p of each value [..., *event_shape], or of each pixel [..., H, W] where the
        channels are joint (`joint_channels`)."""
        raise NotImplementedError

    joint_channels = False

    def coding_steps(self) -> list[tuple]:
        """The order a codec codes an example in, each step an index into [C, H, W] of the
        values coded together: channel by channel where a pixel's channels depend on the ones
        before them, else all at once."""
        return [(c,) for c in range(self.event_shape[0])] if self.joint_channels else [()]

    def table(self, value: torch.Tensor, step: tuple = ()) -> torch.Tensor:
        """P of each of the 256 values, for every value of the step [..., *value[step], 256]
        (step (c,): channel c [..., H, W, 256]). A step's table may read the values of the steps
        before it in `value` (what a codec has decoded); here every value is independent of the
        others and `value` is not read."""
        grid = torch.arange(LEVELS, device=self.mean.device, dtype=self.mean.dtype)
        grid = (grid / (LEVELS - 1)).reshape(-1, *[1] * (len(self.batch_shape)
                                                          + len(self.event_shape)))
        tables = self.log_prob_per_value(grid).movedim(0, -1).exp()
        return tables if not step else tables[..., step[0], :, :, :]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        per_value = self.log_prob_per_value(value)
        event_dims = tuple(range(-len(self.event_shape) + self.joint_channels, 0))
        return per_value.sum(event_dims) if event_dims else per_value  # sum(()) would sum all


class DiscretizedGaussian(DiscreteImage):
    """N(loc, scale^2) integrated over each 8-bit value's bin (edge bins to +-inf)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, event_ndims: int):
        self.loc, self.scale = loc, scale
        super().__init__(loc.shape[:loc.dim() - event_ndims], loc.shape[loc.dim() - event_ndims:])

    def log_prob_per_value(self, value):
        k = bins(value)
        centred = k / (LEVELS - 1) - self.loc
        upper, lower = (centred + HALF_BIN) / self.scale, (centred - HALF_BIN) / self.scale
        log_ndtr = torch.special.log_ndtr
        # Phi(upper) - Phi(lower), taken on the side of the mean where both tails are small
        flip = lower > 0
        hi, lo = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
        log_hi = log_ndtr(hi)
        inner = log_hi + log1mexp(torch.minimum(log_ndtr(lo) - log_hi, log_hi.new_tensor(-1e-12)))
        return log_bin_mass(log_ndtr(upper), log_ndtr(-lower), inner, k)

    @property
    def mean(self):
        return self.loc.clamp(0, 1)

    def sample(self, sample_shape=()):
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            return bins(torch.normal(self.loc.expand(shape), self.scale.expand(shape))) / (
                LEVELS - 1)


def log_logistic_bin(k: torch.Tensor, centred: torch.Tensor, log_scale: torch.Tensor):
    """log P(value k) of a logistic discretized into 8-bit bins. With a = (c + h) / s and
    b = (c - h) / s: sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a)), whose
    log is exact and finite for every a > b (PixelCNN++ falls back to the density there)."""
    inv_scale = torch.exp(-log_scale)
    upper, lower = inv_scale * (centred + HALF_BIN), inv_scale * (centred - HALF_BIN)
    inner = F.logsigmoid(upper) + F.logsigmoid(-lower) + log1mexp(-2 * HALF_BIN * inv_scale)
    return log_bin_mass(F.logsigmoid(upper), F.logsigmoid(-lower), inner, k)


def coupling_pairs(channels: int) -> list[tuple[int, int]]:
    """(c, j) with j < c: channel c's mean moves with the value of channel j (PixelCNN++'s
    dependencies within a pixel: G on R, B on R and G)."""
    return [(c, j) for c in range(channels) for j in range(c)]


class DiscretizedLogisticMixture(DiscreteImage):
    """A mixture of K discretized logistics per pixel, whose channels depend on each other
    within a component as in PixelCNN++ (Salimans et al., 2017) and NVAE: channel c's mean is
    mu_c + sum_{j<c} alpha_cj x_j. `params` [..., K, 1 + 2C + C(C-1)/2, H, W]: the mixture
    logit, C means, C log scales and the coupling coefficients (tanh) of each component.

    `base` [..., K, C, H, W], where given, is each component's prediction from the pixel's
    neighbours (`neighbour_predictions`): the means are offsets from it, and channel c moves with
    channel j's departure from its prediction, x_j - base_j, so that in a flat region nothing
    has to cancel."""

    joint_channels = True

    def __init__(self, params: torch.Tensor, channels: int, min_log_scale: float,
                 base: torch.Tensor | None = None):
        self.channels = channels
        self.logits = params[..., 0, :, :]  # [..., K, H, W]
        self.loc = params[..., 1:1 + channels, :, :]  # [..., K, C, H, W]
        self.base = self.loc.new_zeros(()).expand_as(self.loc) if base is None else base
        self.loc = self.loc if base is None else self.loc + base
        self.log_scale = params[..., 1 + channels:1 + 2 * channels, :, :].clamp_min(min_log_scale)
        self.coeffs = torch.tanh(params[..., 1 + 2 * channels:, :, :])
        batch = params.shape[:-4]
        super().__init__(batch, (channels, *params.shape[-2:]))

    def coupled_loc(self, x: torch.Tensor) -> torch.Tensor:
        """Each component's means given the pixel's values x [..., 1, C, H, W]."""
        loc = list(self.loc.expand(torch.broadcast_shapes(self.loc.shape, x.shape)).unbind(-3))
        for i, (c, j) in enumerate(coupling_pairs(self.channels)):
            loc[c] = loc[c] + self.coeffs[..., i, :, :] * self.departure(x, j)
        return torch.stack(loc, -3)

    def departure(self, x: torch.Tensor, channel: int) -> torch.Tensor:
        """Channel `channel` of x [..., C, H, W] less its prediction (`base`), which the later
        channels' means move with."""
        return x[..., channel, :, :] - self.base[..., channel, :, :]

    def log_prob_per_value(self, value):
        k = bins(value).unsqueeze(-4)  # [..., 1, C, H, W], against K components
        centred = k / (LEVELS - 1) - self.coupled_loc(k / (LEVELS - 1))
        per_channel = log_logistic_bin(k, centred, self.log_scale).sum(-3)  # [..., K, H, W]
        return torch.logsumexp(per_channel + F.log_softmax(self.logits, -3), -3)

    def table(self, value, step=()):
        """P(channel c of each pixel = k | its channels before c in `value`), k = 0..255, for
        step (c,): [..., H, W, 256]. The mixture's weights given the earlier channels are each
        component's share of their probability; a component's 256 masses come from the
        logistic's CDF at the 257 bin edges."""
        if not step:
            raise BadValue("a logistic mixture's channels are coded one at a time, in order")
        channel = step[0]
        k = bins(value).unsqueeze(-4)  # [..., 1, C, H, W]
        x = k / (LEVELS - 1)
        loc = self.coupled_loc(x)  # channel c's means read only the channels before it
        log_weights = F.log_softmax(self.logits, -3)  # [..., K, H, W]
        if channel:
            earlier = slice(0, channel)
            log_weights = log_weights + log_logistic_bin(
                k[..., earlier, :, :], x[..., earlier, :, :] - loc[..., earlier, :, :],
                self.log_scale[..., earlier, :, :]).sum(-3)
        edges = (torch.arange(LEVELS + 1, device=value.device, dtype=loc.dtype) - 0.5) / (
            LEVELS - 1)
        edges[0], edges[-1] = -math.inf, math.inf
        t = (edges - loc[..., channel, :, :, None]) * torch.exp(
            -self.log_scale[..., channel, :, :, None])  # [..., K, H, W, 257]
        weights = F.softmax(log_weights, -3)[..., None]
        return (bin_masses(t, torch.sigmoid) * weights).sum(-4)

    @property
    def mean(self):
        """Each component's expected pixel (channels in order, each at the previous channels'
        expected values), weighted by the component's probability and clipped to [0, 1]."""
        expected = self.loc.clone()
        for i, (c, j) in enumerate(coupling_pairs(self.channels)):
            expected[..., c, :, :] += self.coeffs[..., i, :, :] * self.departure(expected, j)
        weights = F.softmax(self.logits, -3).unsqueeze(-3)
        return (weights * expected.clamp(0, 1)).sum(-4).clamp(0, 1)

    def sample(self, sample_shape=()):
        """A component per pixel, then its channels in order, each a logistic draw rounded to
        the 8-bit grid that the next channel's mean depends on."""
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.logits.shape
            gumbel = -torch.log(-torch.log(torch.rand(shape, device=self.logits.device)
                                           .clamp(1e-10, 1 - 1e-10)))
            pick = F.one_hot((self.logits + gumbel).argmax(-3), shape[-3]).movedim(-1, -3)
            pick = pick.unsqueeze(-3).to(self.loc.dtype)  # [..., K, 1, H, W]
            loc, log_scale = (pick * self.loc).sum(-4), (pick * self.log_scale).sum(-4)
            base = (pick * self.base).sum(-4)
            coeffs = (pick * self.coeffs).sum(-4) if self.coeffs.shape[-3] else None
            u = torch.rand(loc.shape, device=loc.device).clamp(1e-5, 1 - 1e-5)
            noise = log_scale.exp() * (torch.log(u) - torch.log1p(-u))
            x = []
            for c in range(self.channels):
                mean = loc[..., c, :, :]
                for i, (cc, j) in enumerate(coupling_pairs(self.channels)):
                    if cc == c:
                        mean = mean + coeffs[..., i, :, :] * (x[j] - base[..., j, :, :])
                x.append(bins(mean + noise[..., c, :, :]) / (LEVELS - 1))
            return torch.stack(x, -3)


class LogisticMixtureLikelihood(Likelihood):
    """`likelihood=dlogistic`: the discretized logistic mixture of PixelCNN++ / NVAE for 8-bit
    images [C, H, W], `components` per pixel. The decoder's means start at mid-grey and its log
    scales at log(init_scale): a decoder's outputs start near zero.

    `context=k` (odd) makes each pixel's mixture read the pixels before it in a k x k causal
    window as well as the decoder's `hidden` features at the pixel (a local PixelVAE, Gulrajani
    et al., 2017): z says what is where, the window says what the next pixel's neighbours are,
    which is what PNG's filters exploit. Pixels are then no longer independent given z.

    `predictors=true` makes each component's means offsets from a fixed prediction from the
    pixel's neighbours (the left, the one above, ..., LOCO-I's median: `neighbour_predictions`),
    the ones PNG's filters and lossless JPEG choose between, rather than from mid-grey: a flat
    region or a straight edge then costs almost nothing from the first step.

    With a window, the latents tend to carry little: the window, not z, decides the colours.
    `auxiliary=w` trains a second mixture from the same features without the window (z alone)
    beside it, weighted w in the loss and never in the bound; its mean is the reconstruction."""

    discrete = True

    def __init__(self, components: int = 10, init_scale: float = 0.1,
                 min_log_scale: float = -8.0, context: int = 0, hidden: int = 64,
                 auxiliary: float = 0.0, predictors: bool = False):
        super().__init__()
        if components < 1:
            raise BadValue(f"likelihood.components={components} must be at least 1")
        if context < 0 or (context and context % 2 == 0):
            raise BadValue(f"likelihood.context={context}: 0 (pixels independent given z) or an "
                           f"odd window width, e.g. 5")
        self.components, self.min_log_scale = int(components), float(min_log_scale)
        self.log_init_scale = math.log(init_scale)
        if auxiliary and not context:
            raise BadValue(f"likelihood.auxiliary={auxiliary} trains a z-only mixture beside a "
                           f"pixel window: set likelihood.context too (e.g. 5)")
        if predictors and context < 3:
            raise BadValue(f"likelihood.predictors=true predicts a pixel from its neighbours, "
                           f"which likelihood.context={context} does not read: set it to 3 or "
                           f"more (e.g. 5)")
        self.context, self.hidden, self.auxiliary = int(context), int(hidden), float(auxiliary)
        self.predictors = bool(predictors)
        self.window: CausalWindow | None = None
        self.z_only: nn.Linear | None = None

    @staticmethod
    def features(channels: int) -> int:
        """Outputs per component and pixel: logit, means, log scales, couplings."""
        return 1 + 2 * channels + len(coupling_pairs(channels))

    def param_shape(self, data_shape):
        if len(data_shape) != 3:
            raise BadValue(f"likelihood=dlogistic models images [C, H, W], got data of shape "
                           f"{list(data_shape)}")
        channels, height, width = data_shape
        mixture = self.components * self.features(channels)
        if not self.context:
            return (mixture, height, width)
        if self.window is None:
            self.window = CausalWindow(channels, self.context, self.hidden, mixture)
            if self.auxiliary:
                self.z_only = nn.Linear(self.hidden, mixture)
        elif self.window.conv.in_channels != channels:
            raise BadValue(f"this likelihood's window reads {self.window.conv.in_channels} "
                           f"channels, not {channels}: give each model a likelihood of its own")
        return (self.hidden, height, width)

    def coded_per_step(self, data_shape):
        if not self.context:
            return math.prod(data_shape[1:])  # one channel of every pixel
        return max(len(rows) for rows, _ in wavefronts(*data_shape[1:], self.context))

    def mixture(self, out: torch.Tensor,
                base: torch.Tensor | None = None) -> "DiscretizedLogisticMixture":
        """The mixture that raw outputs [..., K * F, H, W] parameterize; its means are offsets
        from `base` where given (`neighbour_predictions`), else from mid-grey."""
        k, (p, h, w) = self.components, out.shape[-3:]
        params = out.reshape(*out.shape[:-3], k, p // k, h, w)
        channels = (math.isqrt(1 + 8 * (p // k)) - 3) // 2  # from F = 1 + 2C + C(C-1)/2
        offsets = params.new_zeros(p // k)
        offsets[1:1 + channels] = 0.5 if base is None else 0.0
        offsets[1 + channels:1 + 2 * channels] = self.log_init_scale
        return DiscretizedLogisticMixture(params + offsets[:, None, None], channels,
                                          self.min_log_scale, base)

    def forward(self, out, event_ndims):
        if self.window is None:
            return self.mixture(out)
        return LocalAutoregressiveMixture(out, self)


class CausalWindow(nn.Module):
    """The mixture parameters of each pixel from the decoder's features there and the image's
    values in the k x k window before it (the rows above, and the pixels to its left): a
    masked convolution (PixelCNN's mask A, van den Oord et al., 2016), then residual blocks
    per pixel, whose identity path lets a mean copy a neighbour from the first step."""

    def __init__(self, channels: int, size: int, hidden: int, out: int, blocks: int = 2):
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(channels, hidden, size, padding=size // 2)
        mask = torch.zeros(size, size)
        mask[:size // 2] = 1
        mask[size // 2, :size // 2] = 1
        self.register_buffer("mask", mask, persistent=False)
        self.blocks = nn.Sequential(*[Residual(hidden) for _ in range(blocks)],
                                    nn.Linear(hidden, out))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Features [..., hidden, H, W] to mixture parameters [..., out, H, W]."""
        return per_pixel(self.blocks, h)

    def read(self, padded: torch.Tensor) -> torch.Tensor:
        """The window's features of every pixel of `pad`ded images [N, C, H + k - 1, W + k - 1]."""
        return F.conv2d(padded, self.conv.weight * self.mask, self.conv.bias)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as `read` sees them: on [-1, 1], padded with zeros."""
        pad = self.size // 2
        return F.pad(2 * x - 1, (pad, pad, pad, pad))

    def read_at(self, padded: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        """`read` at the pixels (rows, cols) only, from `pad`ded images: [N, hidden, 1, P]."""
        offsets = torch.arange(self.size, device=padded.device)
        patches = padded[:, :, rows[:, None, None] + offsets[:, None],
                         cols[:, None, None] + offsets]  # [N, C, P, k, k]
        out = torch.einsum("ncpij,hcij->nhp", patches, self.conv.weight * self.mask)
        return (out + self.conv.bias[:, None]).unsqueeze(-2)


def per_pixel(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """`net` over the channels [..., C, H, W] of each pixel (as matrix products over the
    pixels: 1 x 1 convolutions ran slower on the CPU)."""
    return net(h.movedim(-3, -1)).movedim(-1, -3)


class Residual(nn.Module):
    """h + W2 gelu(W1 gelu(h)), per pixel."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                  nn.Linear(width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


def neighbour_predictions(padded: torch.Tensor, pad: int, components: int,
                          rows: torch.Tensor | None = None,
                          cols: torch.Tensor | None = None) -> torch.Tensor:
    """Each component's prediction of a pixel from its neighbours before it, on [0, 1]: the left
    (W), the one above (N), LOCO-I's median of W, N and the gradient (JPEG-LS), the gradient
    W + N - NW, the average of W and N, above-left, above-right and mid-grey, in turn over the K
    components (the first five: PNG's filters and JPEG-LS's predictor). `padded`: images
    [N, C, H + 2 pad, W + 2 pad] on [-1, 1] as the window reads them (outside the image:
    mid-grey); every pixel [N, K, C, H, W], or the pixels (rows, cols) only [N, K, C, 1, P]."""
    if rows is None:
        height, width = padded.shape[-2] - 2 * pad, padded.shape[-1] - 2 * pad

        def at(di: int, dj: int) -> torch.Tensor:
            return padded[..., pad + di:pad + di + height, pad + dj:pad + dj + width]
    else:
        def at(di: int, dj: int) -> torch.Tensor:
            return padded[..., rows + pad + di, cols + pad + dj].unsqueeze(-2)
    left, up, up_left, up_right = ((at(di, dj) + 1) / 2
                                   for di, dj in ((0, -1), (-1, 0), (-1, -1), (-1, 1)))
    gradient = (left + up - up_left).clamp(0, 1)
    median = torch.stack((left, up, gradient)).median(0).values
    predictions = (left, up, median, gradient, (left + up) / 2, up_left, up_right,
                   torch.full_like(left, 0.5))
    return torch.stack([predictions[k % len(predictions)] for k in range(components)], -4)


def wavefronts(height: int, width: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pixels of an image in groups that a k x k causal window lets be drawn at once:
    pixel (i, j) reads at most k // 2 columns to its right in the rows above, so all pixels
    with the same j + (k // 2 + 1) i are independent given the groups before them (253 groups
    for 64 x 64 and k = 5, instead of 4,096 pixels one by one)."""
    slope = size // 2 + 1
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    front = (j + slope * i).flatten()
    order = torch.argsort(front, stable=True)
    counts = torch.bincount(front).tolist()
    groups = order.split([c for c in counts if c])
    return [(g // width, g % width) for g in groups]


class LocalAutoregressiveMixture(DiscreteImage):
    """p(x|z) = prod over pixels of p(x_ij | z, the pixels before it in its window): a logistic
    mixture per pixel whose parameters read the window. log_prob scores all pixels in one pass;
    `mean` and `sample` draw the pixels group by group (`wavefronts`), each group's mixture
    reading the values drawn before it. The mean image is the auxiliary z-only mixture's
    where there is one, else each pixel's expected value given the expected values before it."""

    joint_channels = True

    def __init__(self, features: torch.Tensor, likelihood: LogisticMixtureLikelihood):
        self.features, self.likelihood = features, likelihood
        self.window = likelihood.window
        channels = self.window.conv.in_channels
        super().__init__(features.shape[:-3], (channels, *features.shape[-2:]))

    def mixture_given(self, value: torch.Tensor) -> "DiscretizedLogisticMixture":
        """Every pixel's mixture given the image `value` [..., C, H, W]."""
        lead = value.shape[:-3]
        padded = self.window.pad(bins(value).reshape(-1, *value.shape[-3:]) / (LEVELS - 1))
        seen = self.window.read(padded)
        h = self.features + seen.reshape(*lead, *seen.shape[1:])
        base = self.base(padded)
        if base is not None:
            base = base.reshape(*lead, *base.shape[1:])
        return self.likelihood.mixture(self.window.head(h), base)

    def base(self, padded: torch.Tensor, rows=None, cols=None) -> torch.Tensor | None:
        """The components' neighbour predictions where the likelihood uses them."""
        if not self.likelihood.predictors:
            return None
        return neighbour_predictions(padded, self.window.size // 2, self.likelihood.components,
                                     rows, cols)

    def log_prob_per_value(self, value):
        return self.mixture_given(value).log_prob_per_value(value)

    def without_window(self) -> "DiscretizedLogisticMixture | None":
        """The auxiliary mixture from z alone (`auxiliary`), or None."""
        head = self.likelihood.z_only
        if head is None:
            return None
        return self.likelihood.mixture(per_pixel(head, self.features))

    def training_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The auxiliary mixture's negative log-likelihood of x, weighted (the loss adds it)."""
        z_only = self.without_window()
        if z_only is None:
            return {}
        return {"auxiliary": -self.likelihood.auxiliary * z_only.log_prob(x).mean()}

    def mixture_at(self, padded: torch.Tensor, rows, cols) -> "DiscretizedLogisticMixture":
        """The mixtures of pixels (rows, cols) given images `padded` by the window (only the
        pixels before them are read), as an image of 1 x P pixels."""
        features = self.features.reshape(-1, *self.features.shape[-3:])[:, :, rows, cols]
        h = features.unsqueeze(-2) + self.window.read_at(padded, rows, cols)
        return self.likelihood.mixture(self.window.head(h), self.base(padded, rows, cols))

    def coding_steps(self):
        fronts = wavefronts(*self.event_shape[1:], self.window.size)
        return [(c, rows, cols) for rows, cols in fronts for c in range(self.event_shape[0])]

    def table(self, value, step=()):
        """P(channel c = k) of the pixels (rows, cols) of step (c, rows, cols), given the
        values before them in `value` [N, C, H, W]: [N, 1, P, 256]."""
        channel, rows, cols = step
        rows, cols = rows.to(value.device), cols.to(value.device)
        value = bins(value) / (LEVELS - 1)
        mixture = self.mixture_at(self.window.pad(value), rows, cols)
        return mixture.table(value[:, :, rows, cols].unsqueeze(-2), (channel,))

    def draw(self, pick, sample_shape=()) -> torch.Tensor:
        """Images drawn group by group, `pick` choosing each group's values from its mixture."""
        shape = torch.Size(sample_shape) + self.batch_shape
        features = self.features.expand(*shape, *self.features.shape[-3:])
        flat = LocalAutoregressiveMixture(features.reshape(-1, *features.shape[-3:]),
                                          self.likelihood)
        image = features.new_zeros(shape.numel(), *self.event_shape)
        padded, pad = self.window.pad(image), self.window.size // 2
        with torch.no_grad():
            for rows, cols in wavefronts(*self.event_shape[1:], self.window.size):
                rows, cols = rows.to(image.device), cols.to(image.device)
                drawn = pick(flat.mixture_at(padded, rows, cols))[:, :, 0]  # [N, C, P]
                image[:, :, rows, cols] = drawn
                padded[:, :, rows + pad, cols + pad] = 2 * drawn - 1
        return image.reshape(*shape, *self.event_shape)

    @property
    def mean(self):
        """The auxiliary mixture's mean where there is one (z's reconstruction), else each
        pixel's expected value given the expected values before it."""
        z_only = self.without_window()
        return z_only.mean if z_only is not None else self.draw(lambda mixture: mixture.mean)

    def sample(self, sample_shape=()):
        return self.draw(lambda mixture: mixture.sample(), sample_shape)
