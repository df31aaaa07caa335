"""What vaelab sends to the configured Lightning loggers beyond the scalars Lightning logs itself:
pictures, the hyperparameters with the final numbers, and a sweep's summary. TensorBoard,
MLflow and W&B each get them in their own way; a logger that takes no images (CSV) gets none.
A logger that fails warns: it must never cost a run."""

import importlib.util
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from vaelab.errors import MissingPackage

log = logging.getLogger(__name__)

IMAGE_LOGGERS = (TensorBoardLogger, MLFlowLogger, WandbLogger)
# As the command was launched: mlflow.set_tracking_uri() exports the variable, and a multirun's
# next job would otherwise log into the previous job's store (see also `close`).
LAUNCH_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def build(specs: Iterable[Any], resume_step: int | None = None) -> list[Logger]:
    """The configured loggers; on resume, TensorBoard hides what the killed run logged after its
    checkpoint (`purge_step`), so the curves continue without a duplicate."""
    loggers = []
    for spec in specs:
        if not spec:
            continue
        make = instantiate(spec, _partial_=True)
        kind = make.func if isinstance(make.func, type) else type(None)
        extra: dict[str, Any] = {}
        if issubclass(kind, MLFlowLogger):
            extra = mlflow_settings(make.keywords)
        if issubclass(kind, TensorBoardLogger) and resume_step:
            extra = {"purge_step": resume_step}
        try:
            loggers.append(make(**extra))
        except ModuleNotFoundError as err:
            raise MissingPackage(f"{kind.__name__} needs a package that is not installed "
                                 f"({err}); install the trackers with: pip install -e "
                                 f"\".[trackers]\"") from err
    return loggers


def mlflow_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The tracking URI (given, else MLFLOW_TRACKING_URI as launched, else a SQLite store in the
    run dir: `mlruns/mlflow.db`, artifacts in `mlruns/artifacts`) and a run name (given, else the
    run dir's name). SQLite is the store MLflow 3 recommends; its file store is in maintenance mode
    and readable only with MLFLOW_ALLOW_FILE_STORE=true."""
    uri = given.get("tracking_uri") or LAUNCH_TRACKING_URI
    store = Path(given.get("save_dir") or "mlruns")
    settings = {"run_name": given.get("run_name") or store.parent.name}
    if not uri and all(importlib.util.find_spec(name) for name in ("sqlalchemy", "alembic")):
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
        settings["artifact_location"] = given.get("artifact_location") or str(
            (store / "artifacts").resolve())
        for name in ("mlflow.store.db.utils", "alembic"):  # table creation, on the console
            logging.getLogger(name).setLevel(logging.WARNING)
    elif not uri:
        log.warning("logger=mlflow: MLflow's SQLite store needs sqlalchemy and alembic, which are "
                    "not installed; using its file store in %s (read it back with "
                    "MLFLOW_ALLOW_FILE_STORE=true)", store)
        uri = f"file:{store}"
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode, behind this switch
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return settings | {"tracking_uri": uri}


def close(loggers: Iterable[Logger]) -> None:
    """Leave the process as the run found it: end the W&B run (Lightning leaves it open, and the
    next run in this process, a multirun's next job, would log into it) and restore
    MLFLOW_TRACKING_URI, which MLflow exports (child processes would inherit this run's store)."""
    if any(isinstance(logger, MLFlowLogger) for logger in loggers):
        if LAUNCH_TRACKING_URI is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = LAUNCH_TRACKING_URI
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            try:
                logger.experiment.finish()
            except Exception as err:  # noqa: BLE001 - a logger must never cost a run
                log.warning("the W&B run could not be finished: %s: %s", type(err).__name__, err)


def takes_images(loggers: Iterable[Logger]) -> bool:
    return any(isinstance(logger, IMAGE_LOGGERS) for logger in loggers)


def as_array(picture) -> np.ndarray:
    """An image tensor [C, H, W] in [0, 1] or a matplotlib figure -> uint8 [H, W, 3]."""
    if isinstance(picture, torch.Tensor):
        image = picture.detach().float().clamp(0, 1).mul(255).round().byte().cpu()
        image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
        return image.permute(1, 2, 0).contiguous().numpy()
    picture.canvas.draw()
    return np.asarray(picture.canvas.buffer_rgba())[..., :3].copy()


def image_summary(tag: str, array: np.ndarray):
    """A TensorBoard image of `array` [H, W, 3], compressed at zlib's fastest level: at the level
    of SummaryWriter's add_image (6), compressing a figure took longer than drawing it."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG", compress_level=1)
    height, width, channels = array.shape
    return Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue()))])


def log_picture(loggers: Iterable[Logger], tag: str, picture, step: int,
                close: bool = True) -> None:
    """One picture (an image tensor or a matplotlib figure, closed here unless `close=False`)
    to every logger that takes images."""
    import matplotlib.pyplot as plt

    array = None
    try:
        for logger in loggers:
            try:
                if not isinstance(logger, IMAGE_LOGGERS):
                    continue
                array = as_array(picture) if array is None else array
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.file_writer.add_summary(image_summary(tag, array), step)
                elif isinstance(logger, MLFlowLogger):
                    logger.experiment.log_image(logger.run_id, array, key=tag, step=step)
                else:
                    logger.log_image(key=tag, images=[array], step=step)
            except Exception as err:  # noqa: BLE001 - a logger must never cost a run
                log.warning("%s could not take %s: %s: %s", type(logger).__name__, tag,
                            type(err).__name__, err)
    finally:
        if close and not isinstance(picture, torch.Tensor):
            plt.close(picture)


def log_final(loggers: Iterable[Logger], params: dict[str, Any], metrics: dict[str, Any],
              step: int) -> None:
    """The run's hyperparameters beside its final numbers (val, test, eval, disentanglement):
    TensorBoard's HParams tab stores them under `hp/` so that the curves get no extra point;
    the others log them as the run's last metrics."""
    final = {k: v for k, v in metrics.items()
             if k.startswith(("val/", "test/", "eval/", "disentanglement/"))
             and isinstance(v, float | int) and "kl_dim_" not in k}
    for logger in loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics={f"hp/{k}": v for k, v in final.items()},
                                       step=step)
            else:
                logger.log_hyperparams(params)
                logger.log_metrics(final, step=step)
            logger.save()
        except Exception as err:  # noqa: BLE001 - a logger must never cost a run
            log.warning("%s could not take the final numbers: %s: %s", type(logger).__name__,
                        type(err).__name__, err)


def log_summary(specs: Iterable[dict[str, Any]], name: str, rows: list[dict[str, Any]],
                figures: dict[str, Any], files: list[Path]) -> None:
    """A sweep's summary as a run of its own in each tracker (`specs`: logger configs that point
    at the sweep dir): the figures; the numbers as one series per column, indexed by job; and
    the summary files as artifacts (MLflow), a table (W&B) or text (TensorBoard). Figures are
    closed here."""
    table = [{k: v for k, v in row.items() if isinstance(v, float | int)} for row in rows]
    for spec in specs:
        target = str(spec.get("_target_", ""))
        if target.endswith("MLFlowLogger"):
            spec = {**spec, "run_name": name}
        elif target.endswith("WandbLogger"):
            spec = {**spec, "name": name}
        try:
            logger = build([spec])[0]
            if not isinstance(logger, IMAGE_LOGGERS):
                continue  # summary.csv already holds what a CSV logger would
            for tag, fig in figures.items():
                log_picture([logger], tag, fig, 0, close=False)
            if isinstance(logger, TensorBoardLogger):
                text = "\n".join(p.read_text() for p in files if p.suffix == ".md")
                logger.experiment.add_text("sweep/summary", text, 0)
            elif isinstance(logger, MLFlowLogger):
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path))
            else:
                columns = sorted({k for row in rows for k in row})
                logger.log_table(key="sweep/summary", columns=columns,
                                 data=[[str(row.get(c, "")) for c in columns] for row in rows])
            if not isinstance(logger, TensorBoardLogger):
                for job, numbers in enumerate(table):
                    logger.log_metrics(numbers, step=job)
            logger.finalize("success")
            close([logger])
        except Exception as err:  # noqa: BLE001 - the summary files are written already
            log.warning("the sweep summary did not reach %s: %s: %s", target,
                        type(err).__name__, err)
