"""Training objectives. Each returns per-example means (nats per example) over the batch.

Keys: `loss` (what is minimized), `recon` (E_q[-log p(x|z)]), `kl` (KL(q(z|x) || p(z)), never
weighted by beta), `elbo` (the beta=1 bound, <= log p(x)) and `nelbo` (= -elbo, the number papers
report as "negative ELBO").
"""

import torch
from torch.distributions import kl_divergence

from vaelab.models.vae import VAE


class ELBO:
    """Negative beta-ELBO: E_q[-log p(x|z)] + beta * KL(q(z|x) || N(0, I)).

    The expectation is a Monte-Carlo mean over `mc_samples` reparameterized draws per input; the
    KL between two diagonal Gaussians is exact.
    """

    def __init__(self, beta: float = 1.0, mc_samples: int = 1):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        self.beta, self.mc_samples = float(beta), int(mc_samples)

    def __call__(self, vae: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q = vae.encode(x)
        z = q.rsample((self.mc_samples,))  # [K, B, latent_dim]
        recon = -vae.decode(z).log_prob(x).mean()  # mean over K samples and B examples
        kl = kl_divergence(q, vae.prior()).mean()
        elbo = -(recon + kl)
        return {"loss": recon + self.beta * kl, "recon": recon, "kl": kl, "elbo": elbo,
                "nelbo": -elbo}
