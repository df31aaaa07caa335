"""Training objectives. Each returns per-example means (nats per example) over the batch.

Keys: `loss` (what is minimized), `recon` (E_q[-log p(x|z)]), `kl` (KL(q(z|x) || p(z)), never
weighted by beta nor clamped by free bits), `elbo` (the beta=1 bound, <= log p(x)), `nelbo`
(= -elbo, the number papers report as "negative ELBO") and `beta` (the weight in use at this
step). Schedules are functions of the optimizer step that Lightning checkpoints, so a resumed run
continues them where it stopped.
"""

import math

import torch
from torch.distributions import Normal

from vaelab.models.vae import VAE


def normal_kl(q: Normal, p: Normal) -> torch.Tensor:
    """KL(q || p) between Gaussians, elementwise, in closed form. The same formula as
    torch.distributions.kl_divergence, whose registry lookup would break torch.compile's graph."""
    var_ratio = (q.scale / p.scale).pow(2)
    mean_term = ((q.loc - p.loc) / p.scale).pow(2)
    return 0.5 * (var_ratio + mean_term - 1 - var_ratio.log())


class ELBO:
    """Negative beta-ELBO: E_q[-log p(x|z)] + beta_t * KL(q(z|x) || N(0, I)).

    The expectation is a Monte-Carlo mean over `mc_samples` reparameterized draws per input; the
    KL between two diagonal Gaussians is exact. beta_t rises linearly from 0 to `beta` over
    `warmup_steps` optimizer steps (0: no warm-up). With `free_bits` = lambda > 0, each latent
    dimension's batch-mean KL counts as at least lambda nats in the loss (Kingma et al., 2016).
    """

    def __init__(self, beta: float = 1.0, mc_samples: int = 1, warmup_steps: int = 0,
                 free_bits: float = 0.0):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if warmup_steps < 0 or free_bits < 0:
            raise ValueError(f"objective.warmup_steps and objective.free_bits must be >= 0, got "
                             f"{warmup_steps} and {free_bits}")
        self.beta, self.mc_samples = float(beta), int(mc_samples)
        self.warmup_steps, self.free_bits = int(warmup_steps), float(free_bits)
        self._estimates = self.estimates  # replaced by a compiled version in compile()

    def beta_at(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup_steps)

    def kl_term(self, kl_per_dim: torch.Tensor) -> torch.Tensor:
        """The KL as the loss sees it: [B, latent_dim] -> scalar, free bits applied."""
        if self.free_bits == 0:
            return kl_per_dim.sum(-1).mean()
        return kl_per_dim.mean(0).clamp_min(self.free_bits).sum()

    def terms(self, vae: VAE, x: torch.Tensor):
        """q, the log-likelihoods [K, B] of K reparameterized draws, and KL per dim [B, D]."""
        q = vae.encode(x)
        z = q.rsample((self.mc_samples,))  # [K, B, latent_dim]
        log_px_z = vae.decode(z).log_prob(x)  # [K, B]
        kl_per_dim = normal_kl(q.base_dist, vae.prior().base_dist)  # [B, latent_dim]
        return q, z, log_px_z, kl_per_dim

    def estimates(self, vae: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything that does not depend on the step, as one function of (vae, x): the part
        that `compile()` hands to torch.compile, so the schedule never triggers a recompile."""
        _, _, log_px_z, kl_per_dim = self.terms(vae, x)
        return {"recon": -log_px_z.mean(), "kl": kl_per_dim.sum(-1).mean(),
                "kl_loss": self.kl_term(kl_per_dim)}

    def compile(self, **options) -> None:
        """torch.compile the estimates (encoder, sampling, decoder, log-likelihood and KL fuse
        into one graph; compiling the two nets alone did not speed up a CPU epoch)."""
        self._estimates = torch.compile(self.estimates, **options)

    def __call__(self, vae: VAE, x: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        est = self._estimates(vae, x)
        recon, kl = est["recon"], est["kl"]
        beta = self.beta_at(step)
        elbo = -(recon + kl)
        return {"loss": recon + beta * est["kl_loss"], "recon": recon, "kl": kl,
                "elbo": elbo, "nelbo": -elbo, "beta": recon.new_tensor(beta)}


def log_importance_weights(vae: VAE, x: torch.Tensor, q, z, log_px_z) -> torch.Tensor:
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) for draws z [K, B, D]: [K, B]."""
    return log_px_z + vae.prior().log_prob(z) - q.log_prob(z)


class IWAE(ELBO):
    """The importance-weighted bound (Burda et al., 2016) with K = `mc_samples` draws:
    log p(x) >= E[log (1/K) sum_k w_k] >= ELBO. `loss` is its negative; recon, KL and the ELBO
    are still logged from the same draws. (beta, warm-up and free bits have no meaning here.)"""

    def estimates(self, vae: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q, z, log_px_z, kl_per_dim = self.terms(vae, x)
        log_w = log_importance_weights(vae, x, q, z, log_px_z)
        iwae = (torch.logsumexp(log_w, 0) - math.log(self.mc_samples)).mean()
        return {"recon": -log_px_z.mean(), "kl": kl_per_dim.sum(-1).mean(), "iwae": iwae}

    def __call__(self, vae: VAE, x: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        est = self._estimates(vae, x)
        recon, kl, iwae = est["recon"], est["kl"], est["iwae"]
        elbo = -(recon + kl)
        return {"loss": -iwae, "recon": recon, "kl": kl, "elbo": elbo, "nelbo": -elbo,
                "iwae": iwae}
