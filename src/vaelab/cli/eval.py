"""`vaelab-eval run_dir=...`: importance-sampled NLL, bits/dim, active units, KL per dimension,
and anomaly scores, written to eval.json, scores.csv and the run's TensorBoard."""

import csv
import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vaelab import evaluation, runs, schema
from vaelab import scores as vaelab_scores
from vaelab.cli import config_dir, reports_user_errors
from vaelab.errors import BadValue

log = logging.getLogger(__name__)


def write_scores(path: Path, named_scores: dict[str, evaluation.Scores]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["set", "index", "label", "nll", "nelbo"])
        for name, s in named_scores.items():
            for i, row in enumerate(zip(s.labels.tolist(), s.nll.tolist(), s.nelbo.tolist(),
                                        strict=True)):
                writer.writerow([name, i, *row])


def disentanglement(vae, run_cfg: DictConfig, cfg: DictConfig) -> dict[str, float]:
    """The disentanglement scores on the run's own data, which must know its factors."""
    data = runs.load_data(run_cfg)
    if not vaelab_scores.has_factors(data):
        raise BadValue(f"disentanglement=true needs data with known factors (data=dsprites); "
                       f"this run trained on {run_cfg.data.get('_target_')}")
    return vaelab_scores.of_model(vae, data, cfg.seed, quick=cfg.disentanglement == "quick")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    schema.validate(cfg, schema.Eval)
    torch.manual_seed(cfg.seed)
    run, ckpt = runs.resolve(cfg.run_dir, cfg.ckpt_path)
    module, step = runs.load_module(ckpt, cfg.device)
    run_cfg = runs.run_config(run)
    sets = {cfg.split: runs.load_split(run_cfg, cfg.split)}
    ood = {k: v for k, v in cfg.ood.items() if v is not None}
    if ood:  # keys replacing the run's data config, or a whole other DataModule (`_target_`)
        data = ood if "_target_" in ood else OmegaConf.merge(run_cfg.data, ood)
        sets["ood"] = runs.load_split(OmegaConf.merge(run_cfg, {"data": None}, {"data": data}),
                                      cfg.split)
    scores = {name: evaluation.score(module.vae, runs.batches(data, cfg.batch_size, cfg.limit),
                                     cfg.nll_samples, cfg.chunk)
              for name, data in sets.items()}
    results = evaluation.summary(scores[cfg.split], module.vae, cfg.nll_samples)
    results["eval/checkpoint"] = str(ckpt)
    if cfg.disentanglement:
        results.update(disentanglement(module.vae, run_cfg, cfg))
    if ood:
        for key in ("nll", "nelbo"):
            results[f"eval/auroc_{key}"] = evaluation.auroc(getattr(scores[cfg.split], key),
                                                            getattr(scores["ood"], key))
        results["eval/ood_nll"] = scores["ood"].nll.mean().item()

    out = Path(cfg.out_dir) if cfg.out_dir else run
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    write_scores(out / "scores.csv", scores)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tensorboard")) as writer:
        for key, value in results.items():
            if isinstance(value, float | int) and not key.startswith("eval/kl_dim_"):
                writer.add_scalar(key, value, step)
    for key in ("eval/nll", "eval/nelbo", "eval/recon", "eval/kl", "eval/bits_per_dim",
                "eval/active_units", "eval/auroc_nll", *(k for k in results
                                                         if k.startswith("disentanglement/"))):
        if key in results:
            log.info("%-18s %s", key, f"{results[key]:.4f}")
    log.info("wrote %s and %s", out / "eval.json", out / "scores.csv")
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
