"""Every model family on MNIST-like and CIFAR-like shapes, and odd sizes the conv must retrace."""

from functools import partial

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaelab.likelihoods import BernoulliLikelihood, GaussianLikelihood, LogisticMixtureLikelihood
from vaelab.models import MLPVAE, ConvVAE, HierarchicalVAE, LadderVAE, VampPrior
from vaelab.models.priors import StandardNormal
from vaelab.models.vae import DiagonalGaussian, normal_kl
from vaelab.objectives import ELBO, IWAE

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 27, 20)]
LIKELIHOODS = [BernoulliLikelihood, GaussianLikelihood,
               partial(GaussianLikelihood, scale="pixel", discretized=True),
               partial(LogisticMixtureLikelihood, components=3)]
FAMILIES = ["mlp", "conv", "map_conv", "cvae", "cvae_conv", "vamp", "vamp_conv", "hvae", "lvae"]
VAMP = partial(VampPrior, components=6)


def build(family, shape, likelihood, latent_dim=5):
    conditional = {"conditional": True, "num_classes": 3} if family.startswith("cvae") else {}
    prior = {"prior": VAMP} if family.startswith("vamp") else {}
    if family == "hvae":
        return HierarchicalVAE(shape, latent_dim, likelihood(), bottom_dim=6, hidden_dims=[16],
                               top_hidden_dims=[8])
    if family == "lvae":
        return LadderVAE(shape, latent_dim, likelihood(), latent_dims=[6, 4],
                         hidden_dims=[16, 8, 8])
    if family.endswith("conv"):
        grid = {"latent_map": 4} if family == "map_conv" else {}
        return ConvVAE(shape, latent_dim, likelihood(), channels=[8, 16], hidden_dim=16,
                       **conditional, **prior, **grid)
    return MLPVAE(shape, latent_dim, likelihood(), hidden_dims=[64, 32], **conditional, **prior)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_shapes_and_a_finite_differentiable_loss(family, shape, likelihood):
    vae = build(family, shape, likelihood)
    d = vae.latent_dim  # [z1, z2] for the hierarchical model: 6 + 5; 5 per cell on a grid
    grid = ((shape[1] + 3) // 4) * ((shape[2] + 3) // 4)  # two stride-2 stages
    assert d == {"hvae": 11, "lvae": 15, "map_conv": 5 * grid}.get(family, 5)
    x = torch.rand(4, *shape)
    y = torch.tensor([0, 1, 2, 1]) if vae.conditional else None
    q = vae.encode(x, y)
    assert q.batch_shape == (4,) and q.event_shape == (d,)
    z = q.rsample((3,))
    p = vae.decode(z, y)
    assert p.batch_shape == (3, 4) and p.event_shape == shape
    assert vae.kl(q, z, y).shape == (3, 4) and vae.prior(y).event_shape == (d,)
    assert vae.reconstruct(x, y).shape == x.shape
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0]) if vae.conditional else None
    assert vae.sample(7, labels).shape == (7, *shape)
    for objective in (ELBO(mc_samples=2), IWAE(mc_samples=2)):
        vae.zero_grad()
        out = objective(vae, x, y)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        grads = [p.grad for p in vae.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_conv_has_the_keras_tutorial_shape():
    vae = ConvVAE((1, 28, 28), 2, BernoulliLikelihood())
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride) for c in convs] == [(32, (2, 2)), (64, (2, 2))]
    assert vae.encoder.head[-1].in_features == 16 and vae.encoder.head[-1].out_features == 4
    assert vae.decoder[0].out_features == 7 * 7 * 64
    ups = [m for m in vae.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [u.out_channels for u in ups] == [64, 32]


def test_channels_last_changes_memory_layout_not_values():
    """The NHWC path (default) computes what the NCHW one does, and checkpoints move between
    them."""
    torch.manual_seed(0)
    nhwc = ConvVAE((3, 27, 20), 4, BernoulliLikelihood(), channels=[8, 16])
    nchw = ConvVAE((3, 27, 20), 4, BernoulliLikelihood(), channels=[8, 16], channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.encoder.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nchw.encoder.features[0].weight.is_contiguous()
    x = torch.rand(5, 3, 27, 20)
    assert nhwc.encoder.features[:2](x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc.encoder(x), nchw.encoder(x))
    z = torch.randn(5, 4)
    torch.testing.assert_close(nhwc.decoder(z), nchw.decoder(z))


def test_mlp_hidden_sizes_are_configurable():
    vae = MLPVAE((1, 28, 28), 20, BernoulliLikelihood(), hidden_dims=[400])
    linears = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 400), (400, 40)]


def test_bad_architecture_settings_are_named():
    with pytest.raises(ValueError, match="activation"):
        MLPVAE((1, 28, 28), 2, BernoulliLikelihood(), activation="swishy")
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        ConvVAE((784,), 2, BernoulliLikelihood())


def test_extreme_encoder_output_keeps_a_finite_posterior():
    vae = MLPVAE((1, 28, 28), 3, BernoulliLikelihood(), hidden_dims=[8])
    with torch.no_grad():
        vae.encoder.head[-1].bias.fill_(1e4)  # log sigma^2 = 1e4 would overflow without the clamp
    q = vae.encode(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(q.variance).all()


@pytest.mark.parametrize("binary", [True, False])
def test_bernoulli_likelihood_is_torchs_summed_over_the_example(binary):
    """vaelab sums before negating (one full-size op fewer); values and gradients stay torch's,
    for K draws of logits against one batch of targets, binary or grey."""
    logits = torch.randn(5, 7, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    x = torch.rand(7, 1, 6, 6, dtype=torch.float64)
    x = torch.bernoulli(x) if binary else x
    ours = BernoulliLikelihood()(logits, 3).log_prob(x)
    torchs = torch.distributions.Independent(
        torch.distributions.Bernoulli(logits=logits, validate_args=False), 3).log_prob(x)
    assert ours.shape == (5, 7)
    torch.testing.assert_close(ours, torchs)
    grad_ours, = torch.autograd.grad(ours.sum(), logits)
    grad_torchs, = torch.autograd.grad(torchs.sum(), logits)
    torch.testing.assert_close(grad_ours, grad_torchs)


def test_bernoulli_likelihood_expands_like_torchs():
    p_x = BernoulliLikelihood()(torch.randn(3, 1, 2, 2), 3)
    wider = p_x.expand((4, 3))
    assert wider.batch_shape == (4, 3) and wider.event_shape == (1, 2, 2)
    assert wider.log_prob(torch.ones(1, 2, 2)).shape == (4, 3)


def test_posterior_log_density_at_its_own_draws_is_torchs_in_value_and_gradient():
    """DiagonalGaussian reuses the noise of its last draw: log q(z) and its gradient in the
    encoder's mean and scale (through z too) are those of torch's Normal; any other z takes the
    general formula."""
    loc = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(7, 4, dtype=torch.float64) + 0.2).requires_grad_()
    torchs = Independent(Normal(loc, scale), 1)
    for z_of in (lambda q: q.rsample((5,)), lambda q: q.rsample((5,)).detach() + 0.3):
        q = DiagonalGaussian(loc, scale)
        z = z_of(q)
        ours, reference = q.log_prob(z), torchs.log_prob(z)
        assert ours.shape == (5, 7)
        torch.testing.assert_close(ours, reference)
        # at its own draws log q does not depend on loc at all (d/dloc = 0, as torch's cancels)
        torch.testing.assert_close(
            torch.autograd.grad(ours.sum(), [loc, scale], allow_unused=True,
                                materialize_grads=True),
            torch.autograd.grad(reference.sum(), [loc, scale]))
    drawn = q.sample((3,))
    assert not drawn.requires_grad and drawn.shape == (3, 7, 4)
    torch.testing.assert_close(q.log_prob(drawn), torchs.log_prob(drawn))
    wider = q.expand((2, 7))
    assert isinstance(wider, DiagonalGaussian) and wider.batch_shape == (2, 7)


def test_unit_gaussian_prior_and_its_kl_are_torchs():
    prior = StandardNormal(6)(None)
    z = torch.randn(3, 5, 6)
    reference = Independent(Normal(torch.zeros(6), torch.ones(6)), 1)
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z))
    q = Normal(torch.randn(5, 6), torch.rand(5, 6) + 0.1)
    torch.testing.assert_close(normal_kl(q), kl_divergence(q, reference.base_dist))
