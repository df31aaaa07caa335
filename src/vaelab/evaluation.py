"""Numbers comparable with papers: importance-sampled log-likelihood, bits per dimension, active
units, KL per latent dimension, and anomaly scores. All per example, in nats."""

import math
from dataclasses import dataclass

import torch

from vaelab.models.vae import VAE
from vaelab.objectives import log_importance_weights

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z_u]) > 0.01


@torch.no_grad()
def importance_sampled(vae: VAE, x: torch.Tensor, samples: int, chunk: int = 50,
                       context: torch.Tensor | None = None, inputs: torch.Tensor | None = None):
    """Per-example (log p(x) estimate, ELBO estimate, E_q[log p(x|z)]) from K = `samples` draws:
    log p(x) ~ logsumexp_k log w_k - log K, ELBO ~ mean_k log w_k. Draws are taken `chunk` at a
    time and folded into a running logsumexp, so memory stays at chunk x batch whatever K is.
    `inputs`: what the encoder sees (a denoising VAE's corrupted x); any proposal q gives an
    unbiased estimate of p(x), so the bound still holds. A deterministic posterior (the VQ-VAE's
    point mass on codes) gives the same draw every time: one is taken, and the estimate is the
    bound log p(x|z) + log p(z)."""
    q = vae.encode(x if inputs is None else inputs, context)
    samples = draws_needed(q, samples)
    running = torch.full((len(x),), -math.inf, device=x.device)
    sum_log_w = torch.zeros(len(x), device=x.device)
    sum_log_px_z = torch.zeros(len(x), device=x.device)
    for start in range(0, samples, chunk):
        z = q.sample((min(chunk, samples - start),))
        log_px_z = vae.decode(z, context).log_prob(x)
        log_w = log_importance_weights(vae, q, z, log_px_z, context)
        running = torch.logaddexp(running, torch.logsumexp(log_w, 0))
        sum_log_w += log_w.sum(0)
        sum_log_px_z += log_px_z.sum(0)
    return running - math.log(samples), sum_log_w / samples, sum_log_px_z / samples


def draws_needed(q, samples: int) -> int:
    """K, or 1 where every draw of q is the same."""
    return 1 if getattr(q, "deterministic", False) else samples


@dataclass
class Scores:
    """Per-example numbers over a dataset, in nats (and the posterior means for unit activity).
    `kl_per_dim` only where the model has a closed-form KL per latent dimension. `recon_mse`:
    the reconstruction's (the likelihood's mean at the posterior mean) squared error per data
    value; `spread`: the same for the dataset's own mean image, the error of a model that
    learned nothing but the average (summed over examples, from running sums). On corrupted
    data the reconstruction is of what the encoder saw, so recon_mse is the denoising error, and
    `input_mse` the corrupted image's own."""

    nll: torch.Tensor
    nelbo: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    means: torch.Tensor
    labels: torch.Tensor
    recon_mse: torch.Tensor
    kl_per_dim: torch.Tensor | None = None
    input_mse: torch.Tensor | None = None
    spread: float = math.nan
    samples: int = 0


@torch.no_grad()
def score(vae: VAE, batches, samples: int, chunk: int = 50) -> Scores:
    """Per-example NLL (importance-sampled), negative ELBO, recon, KL, posterior means; labels
    are the context of conditional models."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in Scores.__dataclass_fields__
                                            if k not in ("spread", "samples")}
    device = vae.device
    image_sum, square_sum, n, draws = 0.0, 0.0, 0, samples
    for x, y, *seen in batches:
        x, y = x.to(device), y.to(device)
        inputs = seen[0].to(device) if seen else None
        context = y if vae.conditional else None
        vae.check_context(context)
        log_px, elbo, log_px_z = importance_sampled(vae, x, samples, chunk, context, inputs)
        q = vae.encode(x if inputs is None else inputs, context)
        draws = draws_needed(q, samples)
        per_dim = vae.kl_per_dim(q)
        # the KL as the ELBO above measured it: exact where it can be, else from the same draws
        kl = per_dim.sum(-1) if per_dim is not None else log_px_z - elbo
        flat = x.flatten(1).double()
        mse = (vae.decode(q.mean, context).mean.flatten(1).double() - flat).pow(2).mean(1)
        input_mse = None if inputs is None else (inputs.flatten(1) - x.flatten(1)).pow(2).mean(1)
        image_sum, square_sum = image_sum + flat.sum(0), square_sum + flat.pow(2).sum()
        n += len(x)
        for key, value in (("nll", -log_px), ("nelbo", -elbo), ("recon", -log_px_z),
                           ("kl", kl), ("means", q.mean), ("labels", y), ("kl_per_dim", per_dim),
                           ("recon_mse", mse.float()), ("input_mse", input_mse)):
            if value is not None:
                parts[key].append(value.cpu())
    spread = ((square_sum - (image_sum.pow(2) / n).sum()) / image_sum.numel()).item() if n else 0
    return Scores(**{k: torch.cat(v) for k, v in parts.items() if v}, spread=spread,
                  samples=draws)


def active_units(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """How many latent units vary with x: Cov_x(E_q[z_u]) > threshold."""
    return int((means.var(0) > threshold).sum())


def bits_per_dim(nll: torch.Tensor, vae: VAE) -> torch.Tensor:
    """Mean NLL per data value in bits. Continuous likelihoods model [0, 1]-scaled 8-bit data, so
    the density becomes a probability of each value's 1/256 bin (+ log 256 nats per value)."""
    dims = math.prod(vae.data_shape)
    nats = nll.mean() + (0 if vae.likelihood.discrete else dims * math.log(256))
    return nats / (dims * math.log(2))


def psnr(mse: torch.Tensor) -> float:
    """The mean over images of 10 log10(1 / MSE), in dB for values in [0, 1] (a perfect image
    counts as 100 dB rather than infinity)."""
    return (10 * torch.log10(1 / mse.double().clamp_min(1e-10))).mean().item()


def summary(scores: Scores, vae: VAE, samples: int) -> dict[str, float]:
    """The eval.json numbers."""
    out = {
        "eval/nll": scores.nll.mean().item(),
        "eval/nelbo": scores.nelbo.mean().item(),
        "eval/recon": scores.recon.mean().item(),
        "eval/kl": scores.kl.mean().item(),
        "eval/bits_per_dim": bits_per_dim(scores.nll, vae).item(),
        "eval/active_units": active_units(scores.means),
        "eval/recon_mse": scores.recon_mse.mean().item(),
        # the reconstruction's squared error over the mean image's: 1 for a model that learned
        # only the average image, 0 for perfect reconstructions
        "eval/recon_mse_ratio": scores.recon_mse.sum().item() / scores.spread
        if scores.spread > 0 else math.nan,
        "eval/nll_samples": scores.samples or samples,
        "eval/examples": len(scores.nll),
    }
    out["eval/psnr"] = psnr(scores.recon_mse)  # of the reconstructions, per image, averaged
    if scores.input_mse is not None:  # corrupted data: the noisy images' own
        out["eval/psnr_input"] = psnr(scores.input_mse)
    if scores.kl_per_dim is not None:
        per_dim = scores.kl_per_dim.mean(0).tolist()
        out.update({f"eval/kl_dim_{u}": v for u, v in enumerate(per_dim)})
    return out


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve for telling out-of-distribution examples (higher score) apart."""
    from sklearn.metrics import roc_auc_score

    labels = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))])
    return float(roc_auc_score(labels.numpy(), torch.cat([in_scores, out_scores]).numpy()))
