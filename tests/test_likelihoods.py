"""The discrete 8-bit likelihoods against direct float64 computations: each distribution puts
probability 1 on the 256 values, and the mixture's log-probability is the textbook sum."""

import math

import pytest
import torch
import torch.nn.functional as F

from vaelab.likelihoods import (
    LEVELS,
    DiscretizedGaussian,
    GaussianLikelihood,
    LogisticMixtureLikelihood,
    neighbour_predictions,
    wavefronts,
)

VALUES = torch.arange(LEVELS, dtype=torch.float64) / (LEVELS - 1)


def mixture(params_per_pixel: torch.Tensor, channels: int):
    """A DiscretizedLogisticMixture over one pixel [C, 1, 1] from params [K * F]."""
    likelihood = LogisticMixtureLikelihood(components=params_per_pixel.shape[0] //
                                           LogisticMixtureLikelihood.features(channels))
    return likelihood(params_per_pixel.reshape(1, -1, 1, 1), 3)


def direct_log_prob(params: torch.Tensor, x: torch.Tensor, channels: int) -> torch.Tensor:
    """log sum_k pi_k prod_c P_kc(x_c), every bin a difference of two sigmoids, in float64."""
    f = LogisticMixtureLikelihood.features(channels)
    comps = params.reshape(-1, f)
    weights = torch.softmax(comps[:, 0] + 0, 0)
    total = torch.zeros((), dtype=torch.float64)
    pairs = [(c, j) for c in range(channels) for j in range(c)]
    for k, row in enumerate(comps):
        loc = (row[1:1 + channels] + 0.5).clone()
        log_s = (row[1 + channels:1 + 2 * channels] + math.log(0.1)).clamp_min(-8.0)
        for i, (c, j) in enumerate(pairs):
            loc[c] = loc[c] + torch.tanh(row[1 + 2 * channels + i]) * x[j]
        p = torch.ones((), dtype=torch.float64)
        for c in range(channels):
            s = log_s[c].exp()
            a, b = (x[c] + 0.5 / 255 - loc[c]) / s, (x[c] - 0.5 / 255 - loc[c]) / s
            if b > 0:  # upper tail: (1 - sigmoid(b)) - (1 - sigmoid(a)), without cancelling
                p = p * ((torch.sigmoid(-b) if x[c] > 0 else 1.0) -
                         (torch.sigmoid(-a) if x[c] < 1 else 0.0))
            else:
                p = p * ((torch.sigmoid(a) if x[c] < 1 else 1.0) -
                         (torch.sigmoid(b) if x[c] > 0 else 0.0))
        total = total + weights[k] * p
    return total.log()


@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.3, 5.0])
@pytest.mark.parametrize("loc", [-0.5, 0.0, 0.37, 1.0, 1.8])
def test_discretized_gaussian_puts_probability_one_on_the_256_values(loc, scale):
    d = DiscretizedGaussian(torch.full((LEVELS,), loc, dtype=torch.float64),
                            torch.full((LEVELS,), scale, dtype=torch.float64), 0)
    log_p = d.log_prob(VALUES)
    assert torch.isfinite(log_p).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    normal = torch.distributions.Normal(loc, scale)
    inner = (normal.cdf(VALUES[100] + 0.5 / 255) - normal.cdf(VALUES[100] - 0.5 / 255)).log()
    if inner.isfinite():
        assert log_p[100].item() == pytest.approx(inner.item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_every_logistic_component_puts_probability_one_on_the_256_values(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):  # one component at a time, grey images
        params = torch.randn(3, generator=g, dtype=torch.float64) * 2
        d = mixture(params, 1)
        log_p = d.log_prob(VALUES.reshape(LEVELS, 1, 1, 1))
        assert torch.isfinite(log_p).all()
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_blue_given_red_and_green_sums_to_one():
    """One component: summed over blue's 256 values, P(r, g, b) is P(r) P(g | r), each a
    single-channel logistic with green's mean moved by red's value."""
    params = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r, g = 0.2, 0.6
    x = torch.stack([torch.full((LEVELS,), r, dtype=torch.float64),
                     torch.full((LEVELS,), g, dtype=torch.float64), VALUES], 1)
    joint = mixture(params, 3).log_prob(x.reshape(LEVELS, 3, 1, 1)).exp().sum()
    one = torch.full((1, 1, 1, 1), 1.0, dtype=torch.float64)
    red = mixture(torch.stack([params[0], params[1], params[4]]), 1).log_prob(one * r)
    green_mean = params[2] + torch.tanh(params[7]) * r
    green = mixture(torch.stack([params[0], green_mean, params[5]]), 1).log_prob(one * g)
    assert joint.item() == pytest.approx((red + green).exp().item(), rel=1e-9)


@pytest.mark.parametrize("channels,components", [(1, 1), (1, 4), (3, 1), (3, 5)])
def test_mixture_log_prob_matches_a_direct_float64_computation(channels, components):
    g = torch.Generator().manual_seed(channels * 10 + components)
    f = LogisticMixtureLikelihood.features(channels)
    for _ in range(6):
        params = torch.randn(components * f, generator=g, dtype=torch.float64) * 1.5
        x = torch.randint(0, LEVELS, (channels,), generator=g).double() / 255
        x[0] = [0.0, 1.0, x[0].item()][int(torch.randint(3, (1,), generator=g))]  # edge bins
        got = mixture(params, channels).log_prob(x.reshape(1, channels, 1, 1))
        assert got.item() == pytest.approx(direct_log_prob(params, x, channels).item(),
                                           rel=1e-9, abs=1e-9)


def test_mixture_is_stable_far_in_the_tails_and_for_tiny_scales():
    """A component whose mean lies far from the value, or whose scale is far below a bin, still
    gives a finite log-probability and gradient (PixelCNN++ needs a fallback there)."""
    params = torch.tensor([0.0, 30.0, -20.0], dtype=torch.float64, requires_grad=True)
    d = mixture(params, 1)
    log_p = d.log_prob(torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64))
    log_p.backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(params.grad).all()
    assert log_p.item() < -1000  # the value is thousands of scales from the mean
    wide = torch.tensor([0.0, 0.0, 60.0], dtype=torch.float64, requires_grad=True)  # e^58 wide
    mixture(wide.float(), 1).log_prob(torch.full((1, 1, 1, 1), 0.5)).backward()
    assert torch.isfinite(wide.grad).all()
    sharp = mixture(torch.tensor([0.0, 128 / 255 - 0.5, -20.0], dtype=torch.float64), 1)
    assert sharp.log_prob(torch.full((1, 1, 1, 1), 128 / 255, dtype=torch.float64)).item() == \
        pytest.approx(math.log(2 * torch.sigmoid(torch.tensor(0.5 / 255 / math.exp(-8.0))).item()
                               - 1), rel=1e-6)  # the smallest scale, e^-8: 99.4% in the bin


def test_mixture_mean_and_samples_follow_the_components():
    """Two components at 0.2 and 0.8 with weights 1:3: the mean is 0.65; samples land on the
    8-bit grid, near the centres, in about those proportions."""
    params = torch.tensor([[0.0, 0.2 - 0.5, math.log(0.01 / 0.1)],
                           [math.log(3), 0.8 - 0.5, math.log(0.01 / 0.1)]]).reshape(1, 6, 1, 1)
    d = LogisticMixtureLikelihood(components=2)(params.expand(1, 6, 40, 50).contiguous(), 3)
    assert d.mean.shape == (1, 1, 40, 50)
    assert d.mean.mean().item() == pytest.approx(0.65, abs=1e-5)
    torch.manual_seed(0)
    x = d.sample()
    assert x.shape == (1, 1, 40, 50)
    assert torch.equal(x, (x * 255).round() / 255)
    high = (x > 0.5).float().mean().item()
    assert high == pytest.approx(0.75, abs=0.05)
    assert (x - torch.where(x > 0.5, 0.8, 0.2)).abs().max().item() < 0.2


def test_rgb_samples_follow_the_channel_coupling():
    """Green's mean is red's value (alpha = tanh(atanh(0.999)) ~ 1): green follows red's draw."""
    f = LogisticMixtureLikelihood.features(3)
    row = torch.zeros(f)
    row[4:7] = math.log(0.001 / 0.1)        # sharp green and blue
    row[4] = math.log(0.2 / 0.1)            # red widely spread around 0.5
    row[2] = -0.5                           # green's own mean 0 (offset +0.5): all from red
    row[7] = math.atanh(0.999)              # green on red
    d = LogisticMixtureLikelihood(components=1)(row.reshape(1, f, 1, 1).expand(1, f, 30, 30), 3)
    torch.manual_seed(0)
    x = d.sample()
    assert x[:, 0].std() > 0.1
    assert (x[:, 1] - x[:, 0].clamp(0, 1)).abs().max() < 0.02


def test_gaussian_per_pixel_scale_and_the_legacy_scale():
    per_pixel = GaussianLikelihood(scale="pixel", discretized=True)
    assert per_pixel.discrete and per_pixel.param_shape((3, 8, 8)) == (6, 8, 8)
    out = torch.zeros(2, 6, 8, 8)
    out[:, 3:] = torch.linspace(-3, 3, 8)  # the decoder's log scale offsets, per pixel
    d = per_pixel(out, 3)
    assert d.scale[0, 0, 0, 0] < d.scale[0, 0, 0, -1]
    assert d.log_prob(torch.zeros(2, 3, 8, 8)).shape == (2,)
    legacy = GaussianLikelihood(scale=0.3)  # a checkpoint's likelihood from before init_scale
    assert not legacy.discrete and legacy.scale.item() == pytest.approx(0.3)
    assert isinstance(legacy.log_scale, torch.nn.Parameter)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_codec_s_tables_are_the_chain_rule_of_the_log_probability(channels):
    """Channel by channel, each value's table given the channels before it: the tables sum to
    one, and the entries of the actual values add up to the pixel's log-probability."""
    torch.manual_seed(channels)
    likelihood = LogisticMixtureLikelihood(components=3)
    d = likelihood(torch.randn(2, *likelihood.param_shape((channels, 4, 5)),
                               dtype=torch.float64), 3)
    x = torch.randint(0, LEVELS, (2, channels, 4, 5)).double() / (LEVELS - 1)
    k = (x * (LEVELS - 1)).round().long()
    chain = sum(d.table(x, (c,)).gather(-1, k[:, c, ..., None])[..., 0].log()
                for c in range(channels))
    torch.testing.assert_close(chain, d.log_prob_per_value(x))
    torch.testing.assert_close(d.table(x, (channels - 1,)).sum(-1),
                               torch.ones(2, 4, 5, dtype=torch.float64))
    gaussian = GaussianLikelihood(scale="pixel", discretized=True)(
        torch.randn(2, 2 * channels, 4, 5, dtype=torch.float64), 3)
    table = gaussian.table(x)
    torch.testing.assert_close(table.gather(-1, k[..., None])[..., 0],
                               gaussian.log_prob_per_value(x).exp())
    torch.testing.assert_close(table.sum(-1), torch.ones_like(x))


def local_mixture(channels: int = 3, size: int = 5, shape=(9, 7), seed: int = 0,
                  predictors: bool = False):
    """A local autoregressive mixture over two random images' worth of decoder features."""
    torch.manual_seed(seed)
    likelihood = LogisticMixtureLikelihood(components=3, context=size, hidden=16,
                                           predictors=predictors)
    features = torch.randn(2, *likelihood.param_shape((channels, *shape)))
    likelihood = likelihood.double()
    return likelihood(features.double(), 3)


@pytest.mark.parametrize("size, predictors", [(3, False), (5, False), (3, True)])
def test_a_pixel_s_window_reads_only_the_pixels_before_it(size, predictors):
    """Flipping one pixel moves no mixture at or before it in raster order, and moves the next
    one and the one below."""
    d = local_mixture(size=size, predictors=predictors)
    x = torch.randint(0, LEVELS, (2, 3, 9, 7)).double() / (LEVELS - 1)
    flipped = x.clone()
    flipped[:, :, 4, 3] = 1 - flipped[:, :, 4, 3]

    def params(m):
        return torch.cat([m.logits.unsqueeze(-3), m.loc, m.log_scale], -3)

    moved = (params(d.mixture_given(x)) - params(d.mixture_given(flipped))).abs().sum(
        (0, 1, 2)) > 0  # [H, W]
    order = torch.arange(9 * 7).reshape(9, 7)
    assert not moved[order <= order[4, 3]].any()
    assert moved[4, 4] and moved[5, 3]
    assert not moved[4 + size // 2 + 1:].any()  # nor beyond the window


@pytest.mark.parametrize("height, width, size", [(9, 7, 5), (64, 64, 5), (28, 28, 3)])
def test_wavefronts_draw_each_pixel_once_after_its_window(height, width, size):
    fronts = wavefronts(height, width, size)
    drawn_at = torch.full((height, width), -1)
    for t, (rows, cols) in enumerate(fronts):
        assert (drawn_at[rows, cols] == -1).all()
        drawn_at[rows, cols] = t
    assert (drawn_at >= 0).all()
    half = size // 2
    for i in range(height):
        for j in range(width):
            window = [(i - a, j + b) for a in range(1, half + 1) for b in range(-half, half + 1)]
            window += [(i, j - b) for b in range(1, half + 1)]
            before = [drawn_at[r, c] for r, c in window if 0 <= r < height and 0 <= c < width]
            assert all(t < drawn_at[i, j] for t in before)
    assert len(fronts) == width + (half + 1) * (height - 1)


@pytest.mark.parametrize("predictors", [False, True])
def test_the_local_mixture_s_step_tables_are_its_chain_rule(predictors):
    """Group by group, channel by channel: each table sums to one, and the entries of the
    actual values add up to the image's log-probability (the codec's order is the model's)."""
    d = local_mixture(predictors=predictors)
    x = torch.randint(0, LEVELS, (2, 3, 9, 7)).double() / (LEVELS - 1)
    k = (x * (LEVELS - 1)).round().long()
    chain = torch.zeros(2, dtype=torch.float64)
    for step in d.coding_steps():
        channel, rows, cols = step
        table = d.table(x, step)[:, 0]  # [N, P, 256]
        torch.testing.assert_close(table.sum(-1), torch.ones(table.shape[:-1],
                                                             dtype=torch.float64))
        chain += table.gather(-1, k[:, channel, rows, cols, None])[..., 0].log().sum(-1)
    torch.testing.assert_close(chain, d.log_prob(x))
    assert len(d.coding_steps()) == 3 * len(wavefronts(9, 7, 5))


@pytest.mark.parametrize("predictors", [False, True])
def test_the_local_mixture_draws_as_a_pixel_by_pixel_loop_would(predictors):
    """The mean image group by group equals the mean drawn pixel by pixel in raster order;
    samples lie on the 8-bit grid."""
    d = local_mixture(predictors=predictors)
    canvas = torch.zeros(2, 3, 9, 7, dtype=torch.float64)
    for i in range(9):
        for j in range(7):
            rows, cols = torch.tensor([i]), torch.tensor([j])
            canvas[:, :, i, j] = d.mixture_at(d.window.pad(canvas), rows, cols).mean[:, :, 0, 0]
    torch.testing.assert_close(d.mean, canvas)
    samples = d.sample((4,))
    assert samples.shape == (4, 2, 3, 9, 7)
    torch.testing.assert_close(samples * 255, (samples * 255).round())


def test_the_auxiliary_mixture_reads_z_alone_and_is_the_reconstruction():
    """With `auxiliary`, the mean image is the z-only mixture's (one pass, no window), the loss
    gains its weighted negative log-likelihood, and the bound is the window's alone."""
    from vaelab.models import ConvVAE
    from vaelab.objectives import ELBO

    torch.manual_seed(0)
    likelihood = LogisticMixtureLikelihood(components=2, context=3, hidden=8, auxiliary=0.5)
    vae = ConvVAE((3, 8, 8), 2, likelihood, channels=[8], latent_map=4)
    d = vae.decode(torch.randn(2, vae.latent_dim))
    z_only = likelihood.mixture(likelihood.z_only(d.features.movedim(-3, -1)).movedim(-1, -3))
    torch.testing.assert_close(d.mean, z_only.mean)
    x = torch.randint(0, LEVELS, (2, 3, 8, 8)).float() / (LEVELS - 1)
    terms = d.training_terms(x)
    torch.testing.assert_close(terms["auxiliary"], -0.5 * z_only.log_prob(x).mean())
    out = ELBO()(vae, x)
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl"] + out["auxiliary"])
    torch.testing.assert_close(out["nelbo"], out["recon"] + out["kl"])
    plain = LogisticMixtureLikelihood(components=2, context=3, hidden=8)
    plain.param_shape((3, 8, 8))
    assert plain.z_only is None
    with pytest.raises(ValueError, match="set likelihood.context"):
        LogisticMixtureLikelihood(auxiliary=1.0)


def test_neighbour_predictions_are_png_s_and_loco_i_s():
    """On a 3 x 3 image: the left, above, median, gradient, average, above-left, above-right and
    mid-grey predictions of the centre pixel, on every pixel at once and at one pixel alone."""
    image = torch.tensor([[10, 200, 40], [90, 0, 0], [0, 0, 0]]).double()[None, None] / 255
    padded = F.pad(2 * image - 1, (2, 2, 2, 2))
    every = neighbour_predictions(padded, 2, 9)[0, :, 0, 1, 1] * 255
    left, up, up_left, up_right = 90, 200, 10, 40
    gradient = min(255, left + up - up_left)  # 280, clipped
    expected = [left, up, sorted([left, up, gradient])[1], gradient, (left + up) / 2, up_left,
                up_right, 127.5, left]
    torch.testing.assert_close(every, torch.tensor(expected).double())
    one = neighbour_predictions(padded, 2, 9, torch.tensor([1]), torch.tensor([1]))
    torch.testing.assert_close(one[0, :, 0, 0, 0] * 255, every)
    assert neighbour_predictions(padded, 2, 9)[0, 0, 0, 0, 0] == 0.5  # outside: mid-grey


def test_with_predictors_a_flat_image_is_nearly_free_before_any_training():
    """Zero decoder outputs and a fresh window: the means are the neighbours themselves, so the
    pixels after the first of a flat image are cheap, and channels couple on departures."""
    torch.manual_seed(0)
    flat = torch.full((1, 3, 16, 16), 77 / 255)
    bits = {}
    for predictors in (False, True):
        likelihood = LogisticMixtureLikelihood(components=10, context=5, hidden=16,
                                               init_scale=5e-4, predictors=predictors)
        likelihood.param_shape((3, 16, 16))
        with torch.no_grad():
            likelihood.window.blocks[-1].weight.zero_()
            likelihood.window.blocks[-1].bias.zero_()
            likelihood.window.blocks[-1].bias.view(10, -1)[:, 7:] = 1.0  # couplings 0.76
        d = likelihood(torch.zeros(1, 16, 16, 16), 3)
        bits[predictors] = -d.log_prob_per_value(flat)[0, 1:, 1:].mean() / math.log(2) / 3
    assert bits[True] < 0.2 < 3 < bits[False]
    with pytest.raises(ValueError, match="set it to 3 or more"):
        LogisticMixtureLikelihood(context=1, predictors=True)
