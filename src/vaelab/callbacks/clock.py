"""Where an epoch's wall time goes, logged epoch by epoch, so that a long run's slowdown shows
in TensorBoard next to the loss (Lightning's profilers sum over the whole run)."""

import time

import lightning as L


class EpochClock(L.Callback):
    """`time/epoch_s` (the training epoch with its validation, pictures and checkpoints),
    `time/val_s` (validation with the pictures drawn after it) and `time/step_ms` (the mean
    training step, the batches' share of the epoch over their count)."""

    def __init__(self):
        self._epoch_start = self._val_start = 0.0
        self._val_s = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start, self._val_s = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_s += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch_s = time.perf_counter() - self._epoch_start
        steps = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        values = {"time/epoch_s": epoch_s, "time/val_s": self._val_s}
        if steps:
            values["time/step_ms"] = (epoch_s - self._val_s) / steps * 1000
        module.log_dict(values, on_step=False, on_epoch=True)
