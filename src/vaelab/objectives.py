"""Training objectives. Each returns per-example means (nats per example) over the batch.

The only required key is `loss` (what is minimized); the others are logged under the same names
in train, val and test: `recon` (E_q[-log p(x|z)]), `kl` (KL(q(z|x) || p(z)) as the model computes
it, never weighted by beta nor clamped by free bits), `elbo` (the beta=1 bound, <= log p(x)),
`nelbo` (= -elbo, the number papers report as "negative ELBO"), `beta` (the weight in use at this
step), for IWAE, `niwae` (the negative importance-weighted bound), and a family's own training
terms (`vae.penalties`: the VQ-VAE's commitment loss) and a likelihood's (a local mixture's
z-only head), which the loss adds and the bound never sees. Schedules are
functions of the optimizer step that Lightning checkpoints, so a resumed run continues them where
it stopped.
Everything about the latent space comes from the model (`encode`, `decode`, `kl`, `prior`).
"""

import math

import torch

from vaelab.errors import BadValue
from vaelab.models.vae import VAE, normal_kl

__all__ = ["ELBO", "IWAE", "BetaTCVAE", "AnnealedCapacity", "DIPVAE", "FactorVAE",
           "log_importance_weights",
           "normal_kl"]


def log_importance_weights(vae: VAE, q, z: torch.Tensor, log_px_z: torch.Tensor,
                           context: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) for draws z [K, B, D]: [K, B]."""
    return log_px_z + vae.prior(context).log_prob(z) - q.log_prob(z)


def training_terms(p, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A likelihood's own training-only terms at the data x (a local mixture's z-only head),
    none for most: they join the loss, never the bound."""
    terms = getattr(p, "training_terms", None)
    return terms(x) if terms is not None else {}


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

    def terms(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None,
              inputs: torch.Tensor | None = None):
        """q, K reparameterized draws z [K, B, D], their log-likelihoods [K, B], KL [K, B], and
        the training-only terms of the family and the likelihood. `inputs`: what the encoder sees
        when it is not x (a denoising VAE's corrupted x); the likelihood always scores x."""
        q = vae.encode(x if inputs is None else inputs, context)
        z = q.rsample((self.mc_samples,))
        p = vae.decode(z, context)
        penalties = {**vae.penalties(q), **training_terms(p, x)}
        return q, z, p.log_prob(x), vae.kl(q, z, context), penalties

    def estimates(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None = None,
                  inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything that does not depend on the step, as one function of (vae, x, context):
        the part that `compile()` hands to torch.compile, so the schedule never recompiles."""
        q, _, log_px_z, kl, penalties = self.terms(vae, x, context, inputs)
        kl_loss = kl.mean()
        if self.free_bits:
            per_dim = vae.kl_per_dim(q)
            if per_dim is None:
                raise BadValue(f"objective.free_bits needs a closed-form KL per latent "
                               f"dimension, which {type(vae).__name__} with this prior lacks; "
                               f"set objective.free_bits=0")
            kl_loss = self.free_bits_kl(per_dim)
        return {"recon": -log_px_z.mean(), "kl": kl.mean(), "kl_loss": kl_loss,
                **penalties}

    def compile(self, **options) -> None:
        """torch.compile the estimates (encoder, sampling, decoder, log-likelihood and KL fuse
        into one graph; compiling the two nets alone did not speed up a CPU epoch)."""
        self._estimates = torch.compile(self.estimates, **options)

    def __call__(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None = None,
                 step: int = 0, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        est = self._estimates(vae, x, context, inputs)
        recon, kl = est["recon"], est["kl"]
        beta = self.beta_at(step)
        elbo = -(recon + kl)
        penalties = {k: v for k, v in est.items() if k not in ("recon", "kl", "kl_loss")}
        return {"loss": recon + beta * est["kl_loss"] + sum(penalties.values()), "recon": recon,
                "kl": kl, "elbo": elbo, "nelbo": -elbo, "beta": recon.new_tensor(beta),
                **penalties}


class IWAE(ELBO):
    """The importance-weighted bound (Burda et al., 2016) with K = `mc_samples` draws:
    log p(x) >= E[log (1/K) sum_k w_k] >= ELBO. `loss` is its negative (`niwae`); recon, KL and
    the ELBO are still logged from the same draws. (beta, warm-up and free bits have no meaning
    here.)"""

    def estimates(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None = None,
                  inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q, z, log_px_z, kl, penalties = self.terms(vae, x, context, inputs)
        log_w = log_importance_weights(vae, q, z, log_px_z, context)
        iwae = (torch.logsumexp(log_w, 0) - math.log(self.mc_samples)).mean()
        return {"recon": -log_px_z.mean(), "kl": kl.mean(), "niwae": -iwae, **penalties}

    def __call__(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None = None,
                 step: int = 0, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        est = self._estimates(vae, x, context, inputs)
        recon, kl, niwae = est["recon"], est["kl"], est["niwae"]
        elbo = -(recon + kl)
        penalties = {k: v for k, v in est.items() if k not in ("recon", "kl", "niwae")}
        return {"loss": niwae + sum(penalties.values()), "recon": recon, "kl": kl, "elbo": elbo,
                "nelbo": -elbo, "niwae": niwae, **penalties}


class Regularized(ELBO):
    """The ELBO's reconstruction and KL, plus a family's own penalty: the loss is
    recon + penalty(...), and `kl`, `elbo`, `nelbo` are logged unweighted as for every objective.
    Subclasses return the penalty and the values to log beside it."""

    def penalty(self, vae: VAE, q, z: torch.Tensor, kl: torch.Tensor, step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, vae: VAE, x: torch.Tensor, context: torch.Tensor | None = None,
                 step: int = 0, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q, z, log_px_z, kl, penalties = self.terms(vae, x, context, inputs)
        recon, kl = -log_px_z.mean(), kl.mean()
        penalty, logged = self.penalty(vae, q, z, kl, step)
        elbo = -(recon + kl)
        return {"loss": recon + penalty + sum(penalties.values()), "recon": recon, "kl": kl,
                "elbo": elbo, "nelbo": -elbo, **logged, **penalties}


class BetaTCVAE(Regularized):
    """beta-TCVAE (Chen et al., 2018): recon + alpha MI + beta TC + gamma DWKL, the KL split into
    the index-code mutual information, the total correlation of q(z) and the dimension-wise KL,
    each estimated on the batch by minibatch-weighted sampling (MWS): for draws z_i ~ q(z|x_i),
    log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log(N M) and log q(z_i,d) likewise per dimension,
    N the training set's size (filled in at fit start), M the batch size.

    The three parts sum to the KL's Monte-Carlo estimate, log q(z|x) - log p(z), exactly. MWS is
    biased by constants (the TC by about (D - 1) log(N M) when posteriors do not overlap) that
    do not change the gradients: compare `tc` across runs of one setting, not with a closed form.
    """

    def __init__(self, beta: float = 6.0, alpha: float = 1.0, gamma: float = 1.0,
                 dataset_size: int | None = None, mc_samples: int = 1):
        super().__init__(beta=beta, mc_samples=mc_samples)
        self.alpha, self.gamma, self.dataset_size = float(alpha), float(gamma), dataset_size

    def decompose(self, vae: VAE, q, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """MI, TC and DWKL [B] for one draw per input, z [B, D]."""
        if self.dataset_size is None:
            raise BadValue("the beta-TCVAE needs the training set's size (objective."
                           "dataset_size); VAEModule fills it in at fit start")
        pairs = vae.pairwise_log_density(q, z)  # [M, M, D]: log q(z_i,d | x_j)
        norm = math.log(self.dataset_size * len(z))
        log_qz = torch.logsumexp(pairs.sum(-1), dim=1) - norm
        log_prod_marginals = (torch.logsumexp(pairs, dim=1) - norm).sum(-1)
        log_qz_x, log_pz = q.log_prob(z), vae.prior().log_prob(z)
        return {"mi": (log_qz_x - log_qz).mean(), "tc": (log_qz - log_prod_marginals).mean(),
                "dwkl": (log_prod_marginals - log_pz).mean()}

    def penalty(self, vae, q, z, kl, step):
        parts = self.decompose(vae, q, z[0])
        return (self.alpha * parts["mi"] + self.beta * parts["tc"] + self.gamma * parts["dwkl"],
                {**parts, "beta": kl.new_tensor(self.beta)})


class AnnealedCapacity(Regularized):
    """Burgess et al. (2018): recon + gamma |KL - C|, the capacity C rising linearly from 0 to
    `capacity` nats over `capacity_steps` optimizer steps, then held."""

    def __init__(self, gamma: float = 1000.0, capacity: float = 25.0,
                 capacity_steps: int = 100_000, mc_samples: int = 1):
        super().__init__(mc_samples=mc_samples)
        self.gamma, self.capacity, self.capacity_steps = float(gamma), float(capacity), \
            int(capacity_steps)

    def capacity_at(self, step: int) -> float:
        return self.capacity * min(1.0, step / max(self.capacity_steps, 1))

    def penalty(self, vae, q, z, kl, step):
        c = self.capacity_at(step)
        return self.gamma * (kl - c).abs(), {"capacity": kl.new_tensor(c)}


class DIPVAE(Regularized):
    """DIP-VAE (Kumar et al., 2018): the KL, plus a push of the covariance of the aggregate
    posterior towards the identity: lambda_od on its squared off-diagonal entries and
    lambda_d = lambda_d_factor * lambda_od on its squared diagonal's distance from 1. Variant `i`
    uses the covariance of the posterior means over the batch; `ii` adds the mean posterior
    variance (the covariance of q(z) itself)."""

    def __init__(self, variant: str = "i", lambda_od: float = 10.0,
                 lambda_d_factor: float = 10.0, beta: float = 1.0, mc_samples: int = 1):
        super().__init__(beta=beta, mc_samples=mc_samples)
        self.variant, self.lambda_od = variant, float(lambda_od)
        self.lambda_d = float(lambda_d_factor) * self.lambda_od

    def covariance(self, q) -> torch.Tensor:
        means = q.mean.reshape(len(q.mean), -1)
        centred = means - means.mean(0)
        cov = centred.T @ centred / len(means)
        if self.variant == "ii":
            cov = cov + torch.diag(q.variance.reshape(len(means), -1).mean(0))
        return cov

    def penalty(self, vae, q, z, kl, step):
        cov = self.covariance(q)
        diagonal = torch.diagonal(cov)
        off = cov - torch.diag(diagonal)
        dip = self.lambda_od * off.pow(2).sum() + self.lambda_d * (diagonal - 1).pow(2).sum()
        return self.beta * kl + dip, {"dip": dip}


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each latent dimension shuffled across the batch on its own: samples of the product of the
    marginals of q(z) (Kim & Mnih, 2018, Algorithm 1)."""
    return torch.stack([column[torch.randperm(len(z), device=z.device)] for column in z.T], 1)


class FactorVAE(torch.nn.Module, Regularized):
    """FactorVAE (Kim & Mnih, 2018): recon + KL + gamma TC, the total correlation of q(z)
    estimated by a discriminator D between draws of q(z) and draws of the product of its
    marginals (dimensions shuffled across the batch): TC ~ E[logit D(z) real - logit fake].

    D is an MLP (`hidden` units x `layers`, LeakyReLU 0.2, as in the paper: 6 x 1000) with its
    own Adam optimizer (`adversary_lr`, `adversary_betas`); VAEModule trains the two by manual
    optimization, the VAE step then the discriminator step on every batch, and checkpoints both
    (Lightning counts both optimizer steps in `global_step`). D sees the first half of the
    batch's draws as q(z) and the second half, shuffled, as the product of marginals."""

    def __init__(self, gamma: float = 35.0, latent_dim: int | None = None, hidden: int = 1000,
                 layers: int = 6, adversary_lr: float = 1e-4,
                 adversary_betas: tuple[float, float] = (0.5, 0.9), mc_samples: int = 1):
        torch.nn.Module.__init__(self)
        Regularized.__init__(self, mc_samples=mc_samples)
        if latent_dim is None:
            raise BadValue("objective.latent_dim is needed to size the discriminator "
                           "(conf/objective/factor_vae.yaml sets it to ${latent_dim})")
        self.gamma, self.adversary_lr = float(gamma), float(adversary_lr)
        self.adversary_betas = tuple(float(b) for b in adversary_betas)
        sizes = [latent_dim, *[hidden] * layers]
        blocks: list[torch.nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            blocks += [torch.nn.Linear(a, b), torch.nn.LeakyReLU(0.2)]
        self.discriminator = torch.nn.Sequential(*blocks, torch.nn.Linear(sizes[-1], 2))

    __call__ = Regularized.__call__  # the objective's call, not nn.Module's forward

    def tc(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(z)
        return (logits[:, 0] - logits[:, 1]).mean()

    def penalty(self, vae, q, z, kl, step):
        tc = self.tc(z[0])
        return kl + self.gamma * tc, {"tc": tc}

    def adversary_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.discriminator.parameters(), lr=self.adversary_lr,
                                betas=self.adversary_betas)

    def adversary_loss(self, vae: VAE, x: torch.Tensor,
                       context: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of D telling draws of q(z) (class 0) from shuffled ones (class 1)."""
        with torch.no_grad():
            z = vae.encode(x, context).rsample()
        half = len(z) // 2
        real, fake = z[:half], permute_dims(z[half:2 * half])
        logits = self.discriminator(torch.cat([real, fake]))
        labels = torch.cat([torch.zeros(half), torch.ones(half)]).long().to(z.device)
        return torch.nn.functional.cross_entropy(logits, labels)
