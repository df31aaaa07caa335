"""`python train.py ...` / `vaelab-train ...`: fit, test the best checkpoint, write metrics.json."""

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from vaelab.checkpointing import check_same_architecture, read_checkpoint, remove_partial_files
from vaelab.cli import config_dir, resume_checkpoint
from vaelab.module import VAEModule

log = logging.getLogger(__name__)

# What TensorBoard's HParams tab lists for every run, so that runs compare side by side.
HPARAM_KEYS = ("model._target_", "data.dataset", "data.binarize", "likelihood._target_",
               "latent_dim", "beta", "mc_samples", "lr", "seed", "data.batch_size",
               "trainer.max_epochs")


def plain(cfg: DictConfig | None) -> Any:
    """Resolved plain containers: what a checkpoint may hold (no OmegaConf objects)."""
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def build_module(cfg: DictConfig, data_shape) -> VAEModule:
    return VAEModule(model=plain(cfg.model), likelihood=plain(cfg.likelihood),
                     objective=plain(cfg.objective), optimizer=plain(cfg.optimizer),
                     scheduler=plain(cfg.scheduler), data_shape=list(data_shape),
                     latent_dim=cfg.latent_dim)


def hparams(cfg: DictConfig) -> dict[str, Any]:
    values = {key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS}
    return {key: str(v) if isinstance(v, list | dict) else v for key, v in values.items()}


def log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """One HParams-tab row per run with its final numbers, stored under `hp/` so that the
    training curves themselves get no extra point."""
    final = {f"hp/{k}": v for k, v in metrics.items()
             if k.startswith(("val/", "test/")) and isinstance(v, float)}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams(cfg), metrics=final, step=trainer.global_step)
        else:
            logger.log_hyperparams(hparams(cfg))
        logger.save()


def build_loggers(cfg: DictConfig, resume_step: int | None) -> list:
    """The configured loggers; on resume, TensorBoard hides what the killed run logged after its
    checkpoint (`purge_step`), so the curves continue without a duplicate."""
    loggers = []
    for spec in (cfg.get("logger") or {}).values():
        if not spec:
            continue
        make = instantiate(spec, _partial_=True)
        tensorboard = isinstance(make.func, type) and issubclass(make.func, TensorBoardLogger)
        loggers.append(make(purge_step=resume_step) if tensorboard and resume_step else make())
    return loggers


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, log hparams with the final metrics, write metrics.json."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.shape)
    ckpt_path = resume_checkpoint(cfg.get("resume"), cfg.get("ckpt_path"))
    resume_step = None
    if ckpt_path:  # refuse a wrong or unsafe checkpoint before any training
        checkpoint = read_checkpoint(ckpt_path)
        check_same_architecture(checkpoint, dict(module.hparams), ckpt_path)
        resume_step = checkpoint.get("global_step")
        remove_partial_files(Path(ckpt_path).parent)
        log.info("resuming from %s at step %s", ckpt_path, resume_step)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = build_loggers(cfg, resume_step)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[c for c in callbacks if c],
                                     logger=loggers or False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        metrics["best_checkpoint"] = best

    metrics = {k: v for k, v in metrics.items() if not k.endswith("_step")}
    if trainer.is_global_zero:
        log_hparams(trainer, cfg, metrics)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("metrics written to %s", output_dir / "metrics.json")
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
