"""What a multirun leaves: one row per job, summary.csv / summary.md, and a rate-distortion plot.

Runs as a Hydra callback at the end of every multirun and on demand (`vaelab-summarize`), and
reads only what the jobs wrote (`.hydra/`, `metrics.json`, `error.json`), so a failed or killed
job is a row, never a crash of the summary.
"""

import copy
import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab import schema
from vaelab.errors import BadValue, MissingFile

log = logging.getLogger(__name__)
METRICS = ("test/recon", "test/kl", "test/nelbo", "val/nelbo")
ERROR_FILE = "error.json"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job folder under a multirun dir (a folder with Hydra's .hydra/overrides.yaml)."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (len(p.parts), p.name))


def job_row(job: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"job": job.name}
    try:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        config = schema.read_config(job / ".hydra" / "config.yaml")
    except (yaml.YAMLError, OSError, BadValue) as err:  # a damaged job is a row, not a crash
        return row | {"status": f"unreadable: {str(err).splitlines()[0]}"}
    row.update(dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("+")))
    # the values as built: `objective.beta=4` leaves the top-level `beta` at its default
    row["latent_dim"] = config.get("latent_dim")
    row["beta"] = OmegaConf.select(config, "objective.beta", default=None)
    row["method"] = str(OmegaConf.select(config, "objective._target_", default="")).rpartition(
        ".")[2]
    metrics_file, error_file = job / "metrics.json", job / ERROR_FILE
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        row.update({k: metrics.get(k) for k in METRICS})
        row.update({k: v for k, v in metrics.items()
                    if k.startswith(("eval/", "disentanglement/"))})
        row["train_time_s"] = metrics.get("time/train_s")
        row["status"] = "ok"
    elif error_file.is_file():
        row["status"] = "failed: " + json.loads(error_file.read_text())["error"]
    else:
        row["status"] = "incomplete (killed, or still running)"
    return row


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Job, latent_dim, beta, the overrides that differ between jobs, evaluation metrics, then
    the test metrics, time and status."""
    tail = [*METRICS, "train_time_s", "status"]
    keys = dict.fromkeys(k for row in rows for k in row if k not in tail)
    varying = [k for k in keys if k in ("job", "latent_dim", "beta")
               or k.startswith(("eval/", "disentanglement/"))
               or len({str(row.get(k)) for row in rows}) > 1]
    return [*varying, *tail]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def write_tables(rows: list[dict[str, Any]], sweep_dir: Path, best: dict | None) -> None:
    cols = columns(rows)
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, cols, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Sweep {sweep_dir}", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in cols) + " |"
              for row in rows]
    if best:
        lines += ["", "## Best trial (Optuna)", "", f"value: {fmt(best.get('best_value'))}",
                  "", *(f"- {k}: {v}" for k, v in best.get("best_params", {}).items())]
    lines += ["", "![rate-distortion](rate_distortion.png)", ""]
    if any(k.startswith("disentanglement/") for row in rows for k in row):
        lines += ["![scores against beta](scores_vs_beta.png)", ""]
    (sweep_dir / "summary.md").write_text("\n".join(lines))


def pyplot():
    """matplotlib's pyplot on its file backend, imported only when a summary is drawn: Hydra
    builds SummarizeSweep for every command, and `--help` or a bad value must not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rate_distortion_figure(rows: list[dict[str, Any]]):
    """KL (rate) against reconstruction (distortion): one line per latent_dim, points by beta."""
    done = [r for r in rows if r["status"] == "ok" and r.get("test/kl") is not None]
    fig, ax = pyplot().subplots(figsize=(7, 5), dpi=100)
    for latent_dim in sorted({r["latent_dim"] for r in done}):
        group = sorted((r for r in done if r["latent_dim"] == latent_dim),
                       key=lambda r: (r["beta"] is None, r["beta"] or 0))
        rate, distortion = [r["test/kl"] for r in group], [r["test/recon"] for r in group]
        ax.plot(rate, distortion, "o-", label=f"latent_dim={latent_dim}")
        for r in (r for r in group if r["beta"] is not None):
            ax.annotate(f"β={r['beta']:g}", (r["test/kl"], r["test/recon"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("rate: test KL(q(z|x) || p(z)) [nats]")
    ax.set_ylabel("distortion: test E_q[-log p(x|z)] [nats]")
    ax.set_title("rate-distortion")
    if done:
        ax.legend()
    fig.tight_layout()
    return fig


def scores_figure(rows: list[dict[str, Any]]):
    """Each disentanglement score against beta: one line per method (objective) and
    latent_dim, the mean over the jobs that differ only in seed, their min-max as a band."""
    done = [r for r in rows if r["status"] == "ok" and r.get("beta") is not None]
    names = sorted({k for r in done for k in r if k.startswith("disentanglement/")})
    fig, axes = pyplot().subplots(1, len(names), figsize=(3.2 * len(names), 3.4), dpi=100,
                             squeeze=False)
    methods = sorted({(str(r.get("method")), r["latent_dim"]) for r in done})
    for ax, name in zip(axes[0], names, strict=True):
        for method, latent_dim in methods:
            group = [r for r in done if (str(r.get("method")), r["latent_dim"]) == (method,
                                                                                  latent_dim)]
            betas = sorted({r["beta"] for r in group})
            values = [[r[name] for r in group if r["beta"] == b and r.get(name) is not None]
                      for b in betas]
            kept = [(b, v) for b, v in zip(betas, values, strict=True) if v]
            if not kept:
                continue
            xs = [b for b, _ in kept]
            ax.plot(xs, [sum(v) / len(v) for _, v in kept], "o-",
                    label=f"{method}" + (f", d={latent_dim}" if len(methods) > 1 else ""))
            ax.fill_between(xs, [min(v) for _, v in kept], [max(v) for _, v in kept], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("β")
        ax.set_title(name.split("/", 1)[1], fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def summarize(sweep_dir: str | Path, logger_specs: list[dict[str, Any]] | None = None
              ) -> list[dict[str, Any]]:
    """Write summary.csv, summary.md, rate_distortion.png (and scores_vs_beta.png on factor
    data), and send them to the loggers (`logger_specs`, pointing at the sweep dir; TensorBoard
    when not given)."""
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise MissingFile(f"{sweep_dir} holds no job folders (no */.hydra/overrides.yaml):"
                          f" point sweep_dir at a `python train.py -m ...` output folder")
    rows = [job_row(job) for job in jobs]
    results = sweep_dir / "optimization_results.yaml"
    best = yaml.safe_load(results.read_text()) if results.is_file() else None
    write_tables(rows, sweep_dir, best)
    figures = {"sweep/rate_distortion": rate_distortion_figure(rows)}
    if any(k.startswith("disentanglement/") for row in rows for k in row):
        figures["sweep/scores_vs_beta"] = scores_figure(rows)
    for tag, fig in figures.items():
        fig.savefig(sweep_dir / f"{tag.split('/')[1]}.png")
    if logger_specs is None:
        logger_specs = [{"_target_": "lightning.pytorch.loggers.TensorBoardLogger",
                         "save_dir": str(sweep_dir), "name": "tensorboard", "version": ""}]
    from vaelab import loggers

    loggers.log_summary(logger_specs, f"summary of {sweep_dir.name}", rows, figures,
                        [sweep_dir / "summary.md", sweep_dir / "summary.csv"])
    for fig in figures.values():
        pyplot().close(fig)
    failed = sum(not r["status"].startswith("ok") for r in rows)
    log.info("summary of %d jobs (%d not ok) in %s", len(rows), failed, sweep_dir / "summary.md")
    return rows


def sweep_logger_specs(config: DictConfig, sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The run config's loggers, resolved with the sweep dir as their output dir."""
    config = copy.deepcopy(config)
    with open_dict(config):
        config.paths.output_dir = str(sweep_dir)
    return [OmegaConf.to_container(spec, resolve=True)
            for spec in (config.get("logger") or {}).values() if spec]


class SummarizeSweep(Callback):
    """Hydra callback: summarize the sweep dir when a multirun ends; then exit with status 1 if
    any job failed, so that scripts and schedulers see it (the summary is written first)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        rows = summarize(sweep_dir, sweep_logger_specs(config, sweep_dir))
        failed = [r["job"] for r in rows if r["status"].startswith("failed")]
        if failed:
            log.error("%d of %d jobs failed (%s): see %s", len(failed), len(rows),
                      ", ".join(failed), Path(config.hydra.sweep.dir) / "summary.md")
            raise SystemExit(1)
