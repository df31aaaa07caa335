"""Stage two of a VQ-VAE (`python train.py experiment=vqvae_prior vqvae_run=<run dir>`): the
stage-one run's autoencoder is frozen, its codes of every image are computed once
(vaelab.data.codes), and a prior over code grids (a gated PixelCNN) learns from them.

The run it saves is a VQ-VAE with a learned prior, which `vaelab-eval` and `vaelab-generate`
read like any other run: its `.hydra/config.yaml` holds the stage-one model, likelihood and data
with the new prior, and its checkpoints are VAEModule checkpoints.
"""

import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab import loadable, runs
from vaelab.checkpointing import read_checkpoint
from vaelab.cli import write_atomically
from vaelab.data.codes import CodeDataModule
from vaelab.errors import BadValue
from vaelab.module import VAEModule

log = logging.getLogger(__name__)
VQVAE_TARGET = "vaelab.models.VQVAE"


class PriorStage(VAEModule):
    """A VAEModule whose batches are a frozen VQ-VAE's codes, labels and -log p(x | z_q): the
    loss is -log p(codes) (nats per image, logged as `kl`), and `nelbo` is the whole bound
    -log p(x | z_q) - log p(z_q), as stage one logs it."""

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.vae.freeze_autoencoder()

    def losses(self, batch) -> dict[str, torch.Tensor]:
        codes, y, recon = batch
        context = y if self.vae.conditional else None
        self.vae.check_context(context)
        kl = -self.vae.prior_net.log_prob_codes(codes, context).mean()
        recon = recon.mean()
        return {"loss": kl, "recon": recon, "kl": kl, "elbo": -(recon + kl),
                "nelbo": recon + kl}


def first_stage(vqvae_run: str) -> tuple[Path, Path, DictConfig]:
    """The stage-one run dir, its checkpoint and its config, refused unless it is a VQ-VAE that
    vaelab may build."""
    run, ckpt = runs.resolve(vqvae_run, None)
    config = runs.run_config(run)
    target = OmegaConf.select(config, "model._target_")
    if target != VQVAE_TARGET:
        raise BadValue(f"vqvae_run={vqvae_run} trained {target}, not a VQ-VAE: stage two learns "
                       f"a prior over a VQ-VAE's codes (train one with model=vqvae)")
    return run, ckpt, config


def configure(cfg: DictConfig, first: DictConfig, images) -> DictConfig:
    """This run's config: the stage-one model (with `prior` as its prior), likelihood, data and
    latent_dim, each checked as loadable; the prior is class-conditional where `prior_conditional`
    says (auto: where every image has one of at least 2 labels)."""
    sections = {key: OmegaConf.to_container(first[key], resolve=True)
                for key in ("model", "likelihood", "data")}
    for key, spec in sections.items():
        loadable.check(spec, f"vqvae_run's {key} config")
    conditional = cfg.get("prior_conditional", "auto")
    if conditional == "auto":
        conditional = (getattr(images, "num_classes", None) or 0) >= 2 \
            and not getattr(images, "unlabelled", 0)
    sections["model"]["prior"] = OmegaConf.to_container(cfg.prior, resolve=True)
    sections["model"]["conditional_prior"] = bool(conditional)
    merged = cfg.copy()
    with open_dict(merged):
        for key, spec in sections.items():
            merged[key] = spec
        merged.latent_dim = first.latent_dim
    return merged


def build(cfg: DictConfig, output_dir: Path):
    """(this run's config, the codes' DataModule, the PriorStage module with the stage-one
    weights), and the run's `.hydra/config.yaml` rewritten to the config it trains with."""
    _, ckpt, first = first_stage(cfg.vqvae_run)
    images = runs.load_data(first)
    cfg = configure(cfg, first, images)
    from vaelab.training import build_module

    module = build_module(cfg, images, PriorStage)
    state = read_checkpoint(ckpt)["state_dict"]  # refused if unsafe, as every checkpoint is
    weights = {k.removeprefix("vae."): v for k, v in state.items()
               if k.startswith("vae.") and not k.startswith("vae.prior_net.")}
    missing, unexpected = module.vae.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("prior_net.") for k in missing):
        raise BadValue(f"vqvae_run={cfg.vqvae_run}'s weights do not fit its own config "
                       f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
    codes = CodeDataModule(images, module.vae, OmegaConf.to_container(cfg.data, resolve=True),
                           output_dir / "codes.pt", cfg.prior_batch_size,
                           cfg.data.get("eval_batch_size"), cfg.seed)
    hydra_config = output_dir / ".hydra" / "config.yaml"
    if hydra_config.parent.is_dir():
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # as Hydra writes
        write_atomically(hydra_config, OmegaConf.to_yaml(task))
    # the frozen autoencoder is in eval mode on purpose (Lightning warns of any such module)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    log.info("stage two: a %s prior over the codes of %s", type(module.vae.prior_net).__name__,
             cfg.vqvae_run)
    return cfg, codes, module
