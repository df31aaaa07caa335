"""The ladder VAE: against the exact log-likelihood of a linear-Gaussian ladder, its top-down
posterior and prior, per-layer numbers, and through train, eval and generate."""

import pytest
import torch
from torch.distributions import MultivariateNormal

from tests.test_families import nll_gap
from vaelab.likelihoods import BernoulliLikelihood, GaussianLikelihood, LogisticMixtureLikelihood
from vaelab.models import ConvLadderVAE, LadderVAE
from vaelab.models.ladder import merge
from vaelab.objectives import IWAE


class LinearLadder:
    """p(z3) = N(0, I), p(z_i | z_{i+1}) = N(A_i z_{i+1} + a_i, diag(s_i^2)), p(x | z1) =
    N(B z1 + b, s^2 I): x is Gaussian, so log p(x) is exact. A LadderVAE with no hidden layers
    (depth=0) is exactly this model once its top-down heads hold these weights."""

    def __init__(self, x_dim=5, sizes=(3, 2, 1), s=0.8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.sizes, self.s, self.x_dim = sizes, s, x_dim
        self.A = [torch.randn(sizes[i], sizes[i + 1], generator=g) for i in range(len(sizes) - 1)]
        self.a = [torch.randn(sizes[i], generator=g) for i in range(len(sizes) - 1)]
        self.scales = [torch.rand(sizes[i], generator=g) * 0.5 + 0.3
                       for i in range(len(sizes) - 1)]
        self.B, self.b = torch.randn(x_dim, sizes[0], generator=g), torch.randn(x_dim, generator=g)

    def exact(self) -> MultivariateNormal:
        mean, cov = torch.zeros(self.sizes[-1]), torch.eye(self.sizes[-1])
        for i in range(len(self.sizes) - 2, -1, -1):
            mean = self.A[i] @ mean + self.a[i]
            cov = self.A[i] @ cov @ self.A[i].T + torch.diag(self.scales[i] ** 2)
        return MultivariateNormal(self.B @ mean + self.b,
                                  self.B @ cov @ self.B.T + self.s**2 * torch.eye(self.x_dim))

    def vae(self) -> LadderVAE:
        vae = LadderVAE((self.x_dim,), self.sizes[-1], GaussianLikelihood(self.s,
                                                                          learn_scale=False),
                        latent_dims=self.sizes[:-1], hidden_dims=[self.x_dim] * 3, depth=0,
                        batch_norm=False)
        with torch.no_grad():
            for i, head in enumerate(down[1] for down in vae.down):
                head.loc.weight.copy_(self.A[i]), head.loc.bias.copy_(self.a[i])
                head.log_var.weight.zero_(), head.log_var.bias.copy_(2 * self.scales[i].log())
            vae.decoder[1].weight.copy_(self.B), vae.decoder[1].bias.copy_(self.b)
        return vae


def test_a_linear_ladders_nll_is_within_one_nat_of_exact():
    model = LinearLadder()
    vae, exact = model.vae(), model.exact()
    torch.manual_seed(0)
    x = exact.sample((64,))
    # the generative side is fixed at the true model; fit only the bottom-up estimates
    heads = [p for name, p in vae.named_parameters() if name.startswith("estimates")]
    optimizer = torch.optim.Adam(heads, lr=0.02)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 600)
    for _ in range(600):
        optimizer.zero_grad()
        IWAE(mc_samples=16)(vae, exact.sample((128,)))["loss"].backward()
        optimizer.step(), schedule.step()
    gap = nll_gap(vae, x, exact.log_prob(x))
    # 0.00 to 0.05 nats on average; a diagonal merge cannot hold every correlation of the exact
    # posterior, so one image in 64 can sit a nat above it
    assert -0.05 < gap.mean() < 0.5 and gap.abs().max() < 2.0
    # the prior chain samples what its log_prob describes: x = B z1 + b + noise has exact's
    # moments, and z3 the standard normal's
    z = vae.sample_latents(50_000, generator=torch.Generator().manual_seed(0))
    x_draws = z[:, :3] @ model.B.T + model.b
    torch.testing.assert_close(x_draws.mean(0), exact.mean, atol=0.08, rtol=0.05)
    torch.testing.assert_close(torch.cov(x_draws.T) + model.s**2 * torch.eye(5),
                               exact.covariance_matrix, atol=0.15, rtol=0.05)
    assert z[:, -1].std().item() == pytest.approx(1.0, abs=0.02)


def test_the_posterior_merges_estimate_and_prior_by_precision():
    estimate = (torch.tensor([2.0]), torch.tensor([1.0]))  # mean 2, variance 1
    prior = torch.distributions.Normal(torch.tensor([-1.0]), torch.tensor([0.5]))  # var 0.25
    q = merge(estimate, prior)
    assert q.scale.pow(2).item() == pytest.approx(1 / (1 + 4))
    assert q.loc.item() == pytest.approx((2 * 1 + -1 * 4) / 5)


def test_log_prob_and_kl_of_the_chain_are_its_layers():
    torch.manual_seed(0)
    vae = LadderVAE((1, 6, 6), 2, BernoulliLikelihood(), latent_dims=[5, 3],
                    hidden_dims=[16, 8, 8]).eval()
    x = torch.rand(4, 1, 6, 6)
    q = vae.encode(x)
    z = q.rsample((7,))
    assert z.shape == (7, 4, 10) and q.log_prob(z).shape == (7, 4)
    layers = q.layers(z)
    assert [d.loc.shape[-1] for d in layers] == [5, 3, 2]
    parts = z.split([5, 3, 2], -1)
    total = sum(d.log_prob(p).sum(-1) for d, p in zip(layers, parts, strict=True))
    torch.testing.assert_close(q.log_prob(z), total)
    kls = vae.kl_layers(q, z)
    assert len(kls) == 3 and all(k.shape == (7, 4) and (k >= 0).all() for k in kls)
    torch.testing.assert_close(vae.kl(q, z), sum(kls))
    # the per-layer closed forms estimate the same KL as log q - log p from the same draws
    many = q.rsample((4000,))
    mc = (q.log_prob(many) - vae.prior().log_prob(many)).mean(0)
    torch.testing.assert_close(vae.kl(q, many).mean(0), mc, atol=0.15, rtol=0.05)


def test_hidden_widths_must_match_the_layers():
    with pytest.raises(ValueError, match="one width per stochastic layer"):
        LadderVAE((1, 6, 6), 2, BernoulliLikelihood(), latent_dims=[5, 3], hidden_dims=[16, 8])


@pytest.mark.parametrize("shape, bottom, maps", [((1, 28, 28), 7, [7, 4, 2]),
                                                ((3, 64, 64), 16, [16, 8, 4]),
                                                ((3, 30, 30), 16, [15, 8, 4])])
def test_the_conv_ladder_puts_each_layer_one_stage_higher(shape, bottom, maps):
    """Layer i is a map one stride-2 stage above layer i - 1; the decoder retraces the stem's
    sizes to the image's, and the chain's numbers are its layers' as in the MLP form."""
    torch.manual_seed(0)
    likelihood = BernoulliLikelihood() if shape[0] == 1 else LogisticMixtureLikelihood(2)
    vae = ConvLadderVAE(shape, 3, likelihood, latent_channels=[4, 2], width=8,
                        bottom=bottom).eval()
    assert vae.layer_sizes == [c * m * m for c, m in zip([4, 2, 3], maps, strict=True)]
    x = torch.randint(0, 256, (5, *shape)).float() / 255
    q = vae.encode(x)
    z = q.rsample((2,))
    assert z.shape == (2, 5, sum(vae.layer_sizes))
    assert vae.decode(z).log_prob(x).shape == (2, 5)
    kls = vae.kl_layers(q, z)
    assert all(k.shape == (2, 5) and (k >= 0).all() for k in kls)
    torch.testing.assert_close(vae.kl(q, z), sum(kls))
    assert vae.sample(3).shape == (3, *shape)
