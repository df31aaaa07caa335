"""`vaelab-eval run_dir=...`: importance-sampled NLL, bits/dim, active units, KL per dimension,
and anomaly scores, written to eval[_<settings>].json, scores[_<settings>].csv and the run's
TensorBoard. torch and the run's code are imported once the config has passed, so that `--help`
and a bad value answer at once."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from vaelab import schema
from vaelab.cli import collector_paused, config_dir, reports_user_errors, write_atomically
from vaelab.errors import BadValue

if TYPE_CHECKING:
    from vaelab.evaluation import Scores

log = logging.getLogger(__name__)


def output_name(cfg: DictConfig) -> str:
    """`eval` for the paper's setting (test split, K=5000, every example); otherwise the
    settings that differ, e.g. `eval_ood-fashion_mnist_K200_limit1000`, so that an OOD or quick
    evaluation never overwrites the in-domain numbers."""
    parts = [] if cfg.split == "test" else [cfg.split]
    ood = {k: v for k, v in cfg.ood.items() if v is not None}
    if ood:
        other = ood.get("dataset") or Path(str(ood.get("path") or ood.get("_target_"))).name
        parts.append(f"ood-{other}")
    if cfg.nll_samples != 5000:
        parts.append(f"K{cfg.nll_samples}")
    if cfg.limit:
        parts.append(f"limit{cfg.limit}")
    return "_".join(["eval", *parts])


def progress(batches, total: int, what: str):
    """A progress bar on stderr: K=5000 over a test set takes minutes on a CPU."""
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=what, unit="batch", leave=False)


def write_scores(path: Path, named_scores: dict[str, Scores]) -> None:
    lines = io.StringIO()
    writer = csv.writer(lines)
    writer.writerow(["set", "index", "label", "nll", "nelbo"])
    for name, s in named_scores.items():
        for i, row in enumerate(zip(s.labels.tolist(), s.nll.tolist(), s.nelbo.tolist(),
                                    strict=True)):
            writer.writerow([name, i, *row])
    write_atomically(path, lines.getvalue())


def disentanglement(vae, run_cfg: DictConfig, cfg: DictConfig) -> dict[str, float]:
    """The disentanglement scores on the run's own data, which must know its factors."""
    from vaelab import runs
    from vaelab import scores as vaelab_scores

    data = runs.load_data(run_cfg)
    if not vaelab_scores.has_factors(data):
        raise BadValue(f"disentanglement=true needs data with known factors (data=dsprites); "
                       f"this run trained on {run_cfg.data.get('_target_')}")
    return vaelab_scores.of_model(vae, data, cfg.seed, quick=cfg.disentanglement == "quick")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    schema.validate(cfg, schema.Eval)
    with collector_paused():
        import torch

        from vaelab import evaluation, runs

    torch.manual_seed(cfg.seed)
    quality = None
    if cfg.fid:  # no weights, no FID: say so before the NLL's minutes, not after
        from vaelab.sample_quality import inception_metrics

        quality = inception_metrics(2)
    run, ckpt = runs.resolve(cfg.run_dir, cfg.ckpt_path)
    module, step = runs.load_module(ckpt, cfg.device)
    run_cfg = runs.with_corruption(runs.run_config(run), cfg.corruption)
    sets = {cfg.split: runs.load_split(run_cfg, cfg.split)}
    ood = {k: v for k, v in cfg.ood.items() if v is not None}
    if ood:  # keys replacing the run's data config, or a whole other DataModule (`_target_`)
        data = ood if "_target_" in ood else OmegaConf.merge(run_cfg.data, ood)
        sets["ood"] = runs.load_split(OmegaConf.merge(run_cfg, {"data": None}, {"data": data}),
                                      cfg.split)
    scores = {}
    for name, data in sets.items():
        n = len(data) if cfg.limit is None else min(cfg.limit, len(data))
        x, y, *_ = next(runs.batches(data, 1, 1))  # a point-mass posterior needs one draw
        with torch.no_grad():
            q = module.vae.encode(x.to(module.vae.device),
                                  y.to(module.vae.device) if module.vae.conditional else None)
        draws = evaluation.draws_needed(q, cfg.nll_samples)
        batches = progress(runs.batches(data, cfg.batch_size, cfg.limit),
                           math.ceil(n / cfg.batch_size), f"{name}: NLL, K={draws}")
        scores[name] = evaluation.score(module.vae, batches, cfg.nll_samples, cfg.chunk)
    results = evaluation.summary(scores[cfg.split], module.vae, cfg.nll_samples)
    results["eval/checkpoint"] = str(ckpt)
    if cfg.disentanglement:
        results.update(disentanglement(module.vae, run_cfg, cfg))
    if cfg.fid:
        from vaelab.sample_quality import fid_kid

        data = sets[cfg.split]
        n = min(cfg.fid_samples, len(data), cfg.limit or len(data))
        batches = progress(runs.batches(data, cfg.batch_size, n),
                           math.ceil(n / cfg.batch_size), f"{cfg.split}: FID and KID")
        results.update(fid_kid(module.vae, batches, n, cfg.seed, metrics=quality))
    if ood:
        for key in ("nll", "nelbo"):
            results[f"eval/auroc_{key}"] = evaluation.auroc(getattr(scores[cfg.split], key),
                                                            getattr(scores["ood"], key))
        results["eval/ood_nll"] = scores["ood"].nll.mean().item()

    out = Path(cfg.out_dir) if cfg.out_dir else run
    out.mkdir(parents=True, exist_ok=True)
    name = output_name(cfg)
    json_path, csv_path = out / f"{name}.json", out / f"{name.replace('eval', 'scores', 1)}.csv"
    write_atomically(json_path, json.dumps(results, indent=2))
    write_scores(csv_path, scores)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tensorboard")) as writer:
        for key, value in results.items():
            if isinstance(value, float | int) and not key.startswith("eval/kl_dim_"):
                writer.add_scalar(key, value, step)
    for key in ("eval/nll", "eval/nelbo", "eval/recon", "eval/kl", "eval/bits_per_dim",
                "eval/active_units", "eval/auroc_nll", "eval/fid", "eval/kid",
                *(k for k in results
                                                         if k.startswith("disentanglement/"))):
        if key in results:
            log.info("%-18s %s", key, f"{results[key]:.4f}")
    log.info("wrote %s and %s", json_path, csv_path)
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
