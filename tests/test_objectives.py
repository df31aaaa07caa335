"""The ELBO against closed forms: the Gaussian KL, and a linear-Gaussian model with exact p(x)."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from vaelab.likelihoods import GaussianLikelihood
from vaelab.models.vae import VAE
from vaelab.objectives import ELBO, IWAE, normal_kl


def test_gaussian_kl_matches_closed_form_and_monte_carlo():
    torch.manual_seed(0)
    mu, std = torch.randn(3, 5), torch.rand(3, 5) + 0.3
    q = Independent(Normal(mu, std), 1)
    prior = Independent(Normal(torch.zeros(5), torch.ones(5)), 1)
    analytic = normal_kl(q.base_dist, prior.base_dist).sum(-1)
    closed_form = 0.5 * (mu**2 + std**2 - 1 - torch.log(std**2)).sum(-1)
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - prior.log_prob(z)).mean(0)
    torch.testing.assert_close(analytic, closed_form)
    torch.testing.assert_close(analytic, monte_carlo, atol=0.03, rtol=0.01)
    other = Normal(torch.randn(5), torch.rand(5) + 0.5)  # any Gaussian, as torch computes it
    torch.testing.assert_close(normal_kl(q.base_dist, other), kl_divergence(q.base_dist, other))


@pytest.mark.parametrize("objective", [ELBO(beta=0.5, free_bits=0.1), IWAE(mc_samples=3)])
def test_compiled_objective_is_one_graph_with_the_same_numbers(objective):
    """compile=true: the step-free estimates trace as one graph (a graph break, e.g. from
    kl_divergence's registry, would cost most of the speed-up) and give the eager numbers
    (with inductor drawing its noise through torch's generator, as eager does)."""
    from vaelab.likelihoods import BernoulliLikelihood
    from vaelab.models import MLPVAE

    torch.manual_seed(0)
    vae = MLPVAE([1, 4, 4], 2, BernoulliLikelihood(), hidden_dims=[8])
    x = torch.rand(5, 1, 4, 4)
    assert torch._dynamo.explain(objective.estimates)(vae, x).graph_break_count == 0
    torch.manual_seed(1)
    eager = objective(vae, x, step=3)
    objective.compile()
    torch.manual_seed(1)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = objective(vae, x, step=3)
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-5)


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, sigma^2 I) with orthogonal columns in W, so that the
    exact posterior is a diagonal Gaussian and q can equal it."""

    def __init__(self, data_dim=4, latent_dim=2, sigma=0.5, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(data_dim, data_dim, generator=g))
        self.W = q[:, :latent_dim] * torch.tensor([2.0, 0.7])
        self.b = torch.randn(data_dim, generator=g)
        self.sigma, self.latent_dim, self.data_dim = sigma, latent_dim, data_dim
        self.post_var = 1 / (1 + (self.W**2).sum(0) / sigma**2)  # diagonal by construction

    def log_px(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.data_dim)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def vae(self, mean_shift=0.0, logvar_shift=0.0) -> VAE:
        """A VAE whose encoder is the exact posterior (optionally perturbed)."""
        gain = self.post_var[:, None] * self.W.T / self.sigma**2  # posterior mean = gain (x - b)
        encoder = nn.Linear(self.data_dim, 2 * self.latent_dim)
        decoder = nn.Linear(self.latent_dim, self.data_dim)
        with torch.no_grad():
            encoder.weight.copy_(torch.cat([gain, torch.zeros_like(gain)]))
            encoder.bias.copy_(torch.cat([-gain @ self.b + mean_shift,
                                          self.post_var.log() + logvar_shift]))
            decoder.weight.copy_(self.W)
            decoder.bias.copy_(self.b)
        likelihood = GaussianLikelihood(scale=self.sigma, learn_scale=False)
        return VAE(encoder, decoder, likelihood, self.latent_dim, (self.data_dim,))

    def sample_x(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=g)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, self.data_dim, generator=g)


def test_elbo_equals_log_likelihood_under_true_posterior():
    model = LinearGaussian()
    x = model.sample_x(8)
    torch.manual_seed(0)
    out = ELBO(mc_samples=50_000)(model.vae(), x)
    exact = model.log_px(x).mean()
    assert abs(out["elbo"].item() - exact.item()) < 0.02
    assert abs(out["nelbo"].item() + exact.item()) < 0.02


@pytest.mark.parametrize("mean_shift, logvar_shift", [(0.5, 0.0), (0.0, 1.0), (-0.3, -1.0)])
def test_elbo_is_below_log_likelihood_for_any_other_q(mean_shift, logvar_shift):
    model = LinearGaussian()
    x = model.sample_x(16)
    torch.manual_seed(0)
    out = ELBO(mc_samples=20_000)(model.vae(mean_shift, logvar_shift), x)
    # The gap is KL(q || true posterior) > 0, far above the Monte-Carlo noise (< 0.01 nats).
    assert out["elbo"].item() < model.log_px(x).mean().item() - 0.05


def test_losses_are_summed_over_dimensions_and_averaged_over_the_batch():
    model = LinearGaussian()
    vae = model.vae()
    x = model.sample_x(6)
    torch.manual_seed(0)
    out = ELBO(beta=4.0, mc_samples=1)(vae, x)
    torch.manual_seed(0)
    q = vae.encode(x)
    z = q.rsample((1,))
    per_value = Normal(z @ model.W.T + model.b, model.sigma).log_prob(x)  # [1, B, D]
    recon = -per_value.sum(-1).mean()
    kl = (0.5 * (q.mean**2 + q.variance - 1 - q.variance.log())).sum(-1).mean()
    torch.testing.assert_close(out["recon"], recon)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], recon + 4.0 * kl)  # beta weights the loss only
    torch.testing.assert_close(out["elbo"], -(recon + kl))


def test_more_mc_samples_reduce_the_variance_of_the_estimate():
    model = LinearGaussian()
    vae, x = model.vae(mean_shift=0.3), model.sample_x(4)
    spread = {}
    for k in (1, 64):
        torch.manual_seed(0)
        spread[k] = torch.stack([ELBO(mc_samples=k)(vae, x)["recon"] for _ in range(50)]).std()
    assert spread[64] < spread[1] / 4  # ~ 1/sqrt(64) = 1/8 in theory


def test_fixed_gaussian_is_mse_up_to_a_constant():
    lik = GaussianLikelihood(scale=math.sqrt(0.5), learn_scale=False)
    x, mean = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    nll = -lik(mean, 3).log_prob(x)
    mse = ((x - mean) ** 2).sum((1, 2, 3))
    const = 16 * 0.5 * math.log(2 * math.pi * 0.5)
    torch.testing.assert_close(nll, mse + const)
    assert not any(p.requires_grad for p in lik.parameters())
    assert list(GaussianLikelihood(learn_scale=True).parameters())
