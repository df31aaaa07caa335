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


# -- the disentangling objectives -----------------------------------------------------------------

def gaussian_posteriors(means: torch.Tensor, std: float):
    """A VAE stand-in whose posteriors are N(means_j, std^2 I) for inputs j, with an N(0, I)
    prior: what the beta-TCVAE's estimator reads."""
    vae = VAE(nn.Identity(), nn.Identity(), GaussianLikelihood(), means.shape[1],
              (means.shape[1],))
    return vae, Independent(Normal(means, torch.full_like(means, std)), 1)


def test_total_correlation_estimate_finds_a_known_dependence():
    """Posterior means from N(0, [[1, r], [r, 1]]) with posterior std s: the aggregate posterior
    is close to N(0, [[1 + s^2, r], [r, 1 + s^2]]), whose total correlation is
    -log(1 - rho^2) / 2, rho = r / (1 + s^2). MWS adds the same constant whatever the correlation,
    so the estimate for correlated means minus the one for independent means is that TC."""
    from vaelab.objectives import BetaTCVAE

    torch.manual_seed(0)
    r, s, m = 0.8, 0.5, 3000
    rho = r / (1 + s ** 2)
    expected = -0.5 * math.log(1 - rho ** 2)  # 0.263 nats
    objective = BetaTCVAE(dataset_size=100_000)
    estimates = {}
    for name, corr in (("independent", 0.0), ("correlated", r)):
        cov = torch.tensor([[1.0, corr], [corr, 1.0]])
        means = MultivariateNormal(torch.zeros(2), cov).sample((m,))
        vae, q = gaussian_posteriors(means, s)
        z = q.sample()
        parts = objective.decompose(vae, q, z)
        estimates[name] = parts["tc"].item()
        # the three parts are the KL's Monte-Carlo estimate exactly
        kl = (q.log_prob(z) - vae.prior().log_prob(z)).mean()
        torch.testing.assert_close(parts["mi"] + parts["tc"] + parts["dwkl"], kl)
    assert estimates["correlated"] - estimates["independent"] == pytest.approx(expected, abs=0.04)


def test_beta_tcvae_weights_its_parts_and_needs_the_dataset_size():
    from vaelab.objectives import BetaTCVAE

    torch.manual_seed(0)
    vae, q = gaussian_posteriors(torch.randn(64, 3), 0.7)
    z = q.rsample((1,))
    kl = torch.tensor(1.0)
    for beta in (1.0, 6.0):
        objective = BetaTCVAE(beta=beta, alpha=0.5, gamma=2.0, dataset_size=1000)
        torch.manual_seed(1)
        penalty, parts = objective.penalty(vae, q, z, kl, step=0)
        expected = 0.5 * parts["mi"] + beta * parts["tc"] + 2.0 * parts["dwkl"]
        torch.testing.assert_close(penalty, expected)
    with pytest.raises(ValueError, match="dataset_size"):
        BetaTCVAE().decompose(vae, q, z[0])


def test_annealed_capacity_rises_linearly_then_holds():
    from vaelab.objectives import AnnealedCapacity

    objective = AnnealedCapacity(gamma=100.0, capacity=20.0, capacity_steps=1000)
    assert [objective.capacity_at(s) for s in (0, 250, 1000, 5000)] == [0.0, 5.0, 20.0, 20.0]
    penalty, logged = objective.penalty(None, None, None, torch.tensor(8.0), step=250)
    assert penalty.item() == pytest.approx(100.0 * 3.0) and logged["capacity"].item() == 5.0


@pytest.mark.parametrize("variant, expected", [
    # covariance of the means [[4, 1], [1, 1]] (+ mean variance 0.25 on the diagonal for ii)
    ("i", 10 * 2 * 1.0 + 100 * (3.0 ** 2 + 0.0 ** 2)),
    ("ii", 10 * 2 * 1.0 + 10 * (3.25 ** 2 + 0.25 ** 2)),
])
def test_dip_vae_penalizes_the_aggregate_covariance(variant, expected):
    from vaelab.objectives import DIPVAE

    means = MultivariateNormal(torch.zeros(2), torch.tensor([[4.0, 1.0], [1.0, 1.0]])).sample(
        (200_000,))
    q = Independent(Normal(means, torch.full_like(means, 0.5)), 1)
    objective = DIPVAE(variant=variant, lambda_od=10.0,
                       lambda_d_factor=10.0 if variant == "i" else 1.0, beta=0.0)
    penalty, logged = objective.penalty(None, q, None, torch.tensor(0.0), step=0)
    assert logged["dip"].item() == pytest.approx(expected, rel=0.05)
    identity = Independent(Normal(torch.randn(200_000, 2), torch.full((200_000, 2), 1e-3)), 1)
    assert objective.penalty(None, identity, None, torch.tensor(0.0), 0)[0].item() < 0.2


def test_factor_vae_discriminator_learns_a_known_total_correlation():
    """Draws z ~ N(0, [[1, r], [r, 1]]) against their shuffled marginals: the trained
    discriminator's density-ratio estimate of the TC approaches -log(1 - r^2) / 2 (0.83 nats
    for r = 0.9), and a factorized q(z) gets about 0."""
    from vaelab.objectives import FactorVAE

    class Posterior:  # encode(x) = a narrow Gaussian at x: the draws are the inputs
        def encode(self, x, context=None):
            return Independent(Normal(x, torch.full_like(x, 1e-3)), 1)

    torch.manual_seed(0)
    estimates = {}
    for r in (0.0, 0.9):
        objective = FactorVAE(latent_dim=2, hidden=64, layers=2, adversary_lr=3e-3,
                              adversary_betas=(0.9, 0.999))
        optimizer = objective.adversary_optimizer()
        law = MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, r], [r, 1.0]]))
        for _ in range(600):
            loss = objective.adversary_loss(Posterior(), law.sample((512,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            estimates[r] = objective.tc(law.sample((20_000,))).item()
    assert estimates[0.0] == pytest.approx(0.0, abs=0.1)
    assert estimates[0.9] == pytest.approx(-0.5 * math.log(1 - 0.81), abs=0.15)
