"""Training objectives. Each returns per-example means (nats per example) over the batch.

The only required key is `loss` (what is minimized); the others are logged under the same names
in train, val and test: `recon` (E_q[-log p(x|z)]), `kl` (KL(q(z|x) || p(z)) as the model computes
it, never weighted by beta nor clamped by free bits), `elbo` (the beta=1 bound, <= log p(x)),
`nelbo` (= -elbo, the number papers report as "negative ELBO"), `beta` (the weight in use at this
step) and, for IWAE, `niwae` (the negative importance-weighted bound). Schedules are functions of
the optimizer step that Lightning checkpoints, so a resumed run continues them where it stopped.
Everything about the latent space comes from the model (`encode`, `decode`, `kl`, `prior`).
"""

import math

import torch

from vaelab.models.vae import VAE, normal_kl

__all__ = ["ELBO", "IWAE", "log_importance_weights", "normal_kl"]


def log_importance_weights(vae: VAE, q, z: torch.Tensor, log_px_z: torch.Tensor,
                           context: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) for draws z [K, B, D]: [K, B]."""
    return log_px_z + vae.prior(context).log_prob(z) - q.log_prob(z)


class ELBO:
    """Negative beta-ELBO: E_q[-log p(x|z)] + beta_t * KL(q(z|x) || p(z)).

    The expectation is a Monte-Carlo mean over `mc_samples` reparameterized draws per input; the
    KL is the model's (exact for a diagonal Gaussian against N(0, I), else estimated from the same
    draws). beta_t rises linearly from 0 to `beta` over `warmup_steps` optimizer steps (0: no
    warm-up). With `free_bits` = lambda > 0, each latent dimension's batch-mean KL counts as at
    least lambda nats in the loss (Kingma et al., 2016; needs a per-dimension closed-form KL).
    """

    def __init__(self, beta: float = 1.0, mc_samples: int = 1, warmup_steps: int = 0,
                 free_bits: float = 0.0):
        self.beta, self.mc_samples = float(beta), int(mc_samples)
        self.warmup_steps, self.free_bits = int(warmup_steps), float(free_bits)
        self._estimates = self.estimates  # replaced by a compiled version in compile()

    def beta_at(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup_steps)

    def free_bits_kl(self, kl_per_dim: torch.Tensor) -> torch.Tensor:
        """The KL as the loss sees it under free bits: [B, latent_dim] -> scalar."""
        return kl_per_dim.mean(0).clamp_min(self.free_bits).sum()

    def terms(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None):
        """q, K reparameterized draws z [K, B, D], their log-likelihoods [K, B], and KL [K, B]."""
        q = vae.encode(x, context)
        z = q.rsample((self.mc_samples,))
        log_px_z = vae.decode(z, context).log_prob(x)
        return q, z, log_px_z, vae.kl(q, z, context)

    def estimates(self, vae: VAE, x: torch.Tensor,
                  context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything that does not depend on the step, as one function of (vae, x, context):
        the part that `compile()` hands to torch.compile, so the schedule never recompiles."""
        q, _, log_px_z, kl = self.terms(vae, x, context)
        kl_loss = kl.mean()
        if self.free_bits:
            per_dim = vae.kl_per_dim(q)
            if per_dim is None:
                raise ValueError(f"objective.free_bits needs a closed-form KL per latent "
                                 f"dimension, which {type(vae).__name__} with this prior lacks; "
                                 f"set objective.free_bits=0")
            kl_loss = self.free_bits_kl(per_dim)
        return {"recon": -log_px_z.mean(), "kl": kl.mean(), "kl_loss": kl_loss}

    def compile(self, **options) -> None:
        """torch.compile the estimates (encoder, sampling, decoder, log-likelihood and KL fuse
        into one graph; compiling the two nets alone did not speed up a CPU epoch)."""
        self._estimates = torch.compile(self.estimates, **options)

    def __call__(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None = None,
                 step: int = 0) -> dict[str, torch.Tensor]:
        est = self._estimates(vae, x, context)
        recon, kl = est["recon"], est["kl"]
        beta = self.beta_at(step)
        elbo = -(recon + kl)
        return {"loss": recon + beta * est["kl_loss"], "recon": recon, "kl": kl,
                "elbo": elbo, "nelbo": -elbo, "beta": recon.new_tensor(beta)}


class IWAE(ELBO):
    """The importance-weighted bound (Burda et al., 2016) with K = `mc_samples` draws:
    log p(x) >= E[log (1/K) sum_k w_k] >= ELBO. `loss` is its negative (`niwae`); recon, KL and
    the ELBO are still logged from the same draws. (beta, warm-up and free bits have no meaning
    here.)"""

    def estimates(self, vae: VAE, x: torch.Tensor,
                  context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q, z, log_px_z, kl = self.terms(vae, x, context)
        log_w = log_importance_weights(vae, q, z, log_px_z, context)
        iwae = (torch.logsumexp(log_w, 0) - math.log(self.mc_samples)).mean()
        return {"recon": -log_px_z.mean(), "kl": kl.mean(), "niwae": -iwae}

    def __call__(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None = None,
                 step: int = 0) -> dict[str, torch.Tensor]:
        est = self._estimates(vae, x, context)
        recon, kl, niwae = est["recon"], est["kl"], est["niwae"]
        elbo = -(recon + kl)
        return {"loss": niwae, "recon": recon, "kl": kl, "elbo": elbo, "nelbo": -elbo,
                "niwae": niwae}
