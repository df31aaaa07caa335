"""MLflow and W&B beside TensorBoard: read back with their own tools, not through vaelab."""

import json
import os
import time

import numpy as np
import pytest
import torch

from vaelab import loggers
from vaelab.training import train

CPU = "trainer.accelerator=cpu"
PICTURES = ("reconstructions", "samples", "manifold", "latent_scatter", "interpolations")


def test_mlflow_run_holds_params_final_metrics_and_pictures(compose_train, tmp_path,
                                                            monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)

    train(compose_train(CPU, "trainer.max_epochs=2", "objective.beta=2", "latent_dim=3",
                        "eval.nll_samples=4", "logger=[tensorboard,mlflow]"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    # MLflow's recommended store, read back without MLFLOW_ALLOW_FILE_STORE
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train")  # the task name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["latent_dim"] == "3" and params["objective.beta"] == "2"
    assert params["model._target_"] == "vaelab.models.MLPVAE"
    for key in ("test/nelbo", "test/kl", "val/nelbo", "eval/nll"):
        assert run.data.metrics[key] == pytest.approx(metrics[key], rel=1e-6), key
    # the validation curve has both epochs
    assert len(client.get_metric_history(run.info.run_id, "val/nelbo")) >= 2
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for picture in PICTURES:
        assert any(f"pictures~{picture}+" in p and p.endswith(".png") for p in images), picture
    assert list((tmp_path / "mlruns" / "artifacts").rglob("*.png"))  # inside the run dir
    # TensorBoard still gets everything beside it
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def wandb_log(path) -> bytes:
    """The records of an offline run's .wandb file, joined (LevelDB's log format: 32 KiB
    blocks of records with 7-byte headers), so that a key and its value read contiguously."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    parts, pos, block = [], 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's zero padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
    return b"".join(parts)


def test_wandb_offline_run_holds_config_final_metrics_and_images(compose_train, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_train(CPU, "trainer.max_epochs=1", "latent_dim=3", "eval.nll_samples=4",
                        "logger=[wandb]"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")  # what `wandb sync` uploads
    # written by wandb's own service process, which may still be flushing it on a busy machine
    keys = ("test/nelbo", "eval/nll", "val/nelbo")

    def complete(records):
        return b"model._target_" in records and all(
            key.encode() in records and repr(metrics[key]).encode() in records for key in keys)

    deadline = time.monotonic() + 60
    while not complete(records := wandb_log(log_file)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"model._target_" in records and b"vaelab.models.MLPVAE" in records
    for key in keys:
        assert key.encode() in records and repr(metrics[key]).encode() in records, key
    images = [p.name for p in (run_dir / "files" / "media" / "images").rglob("*.png")]
    for picture in PICTURES:
        assert any(name.startswith(f"{picture}_") for name in images), (picture, images)
    # the run was finished: a second run in this process gets a run of its own
    train(compose_train(CPU, "trainer.max_epochs=1", "latent_dim=3", "logger=[wandb]"))
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2


def test_a_figure_and_a_grid_become_the_same_rgb_array_for_every_tracker():
    import matplotlib.pyplot as plt

    grey = torch.full((1, 4, 6), 0.5)
    array = loggers.as_array(grey)
    assert array.shape == (4, 6, 3) and array.dtype == np.uint8 and (array == 128).all()
    fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
    ax.set_facecolor("red")
    array = loggers.as_array(fig)
    assert array.shape == (50, 100, 3)
    plt.close(fig)


def test_a_failing_logger_warns_and_the_others_still_get_the_picture(caplog):
    class Broken(loggers.MLFlowLogger):
        def __init__(self):  # no store at all: every call fails
            pass

        @property
        def experiment(self):
            raise ConnectionError("tracking server unreachable")

    class Collector(loggers.TensorBoardLogger):
        def __init__(self):
            self.images = []
            self.file_writer = self

        @property
        def experiment(self):
            return self

        def add_summary(self, summary, step):
            self.images.append((summary.value[0].tag, step))

    collector = Collector()
    loggers.log_picture([Broken(), collector], "pictures/samples", torch.zeros(1, 2, 2), 7)
    assert collector.images == [("pictures/samples", 7)]
    assert "tracking server unreachable" in caplog.text


def test_tensorboard_gets_the_pictures_pixels_as_a_png(tmp_path):
    import io

    from PIL import Image

    colours = torch.rand(3, 5, 7)
    summary = loggers.image_summary("pictures/x", loggers.as_array(colours))
    image = summary.value[0].image
    assert (image.height, image.width, image.colorspace) == (5, 7, 3)
    png = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert (png == loggers.as_array(colours)).all()
    assert np.abs(png - colours.mul(255).permute(1, 2, 0).numpy()).max() <= 0.5


def test_a_tracker_that_is_not_installed_says_how_to_install_it(monkeypatch):
    from vaelab.errors import UserError

    def missing(self, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'mlflow'")

    monkeypatch.setattr(loggers.MLFlowLogger, "__init__", missing)
    spec = {"_target_": "lightning.pytorch.loggers.MLFlowLogger", "save_dir": "mlruns"}
    with pytest.raises(UserError, match=r"pip install -e \"\.\[trackers\]\""):
        loggers.build([spec])
