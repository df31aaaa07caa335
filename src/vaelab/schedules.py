"""Learning-rate schedules that need a formula rather than a torch class, or the trainer's
budget (its clock) rather than the epoch count."""

import math

import lightning as L
from lightning.pytorch.callbacks import Timer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vaelab.errors import BadValue


def iwae_paper(optimizer: Optimizer, stages: int = 8, epochs: int | None = None) -> LambdaLR:
    """Burda et al. (2016): for i = 0..stages-1, 3^i epochs at lr x 10^(-i/7) (3280 epochs in
    all for 8 stages), then the last rate. With `epochs`, the same stages in proportion squeezed
    into that many epochs, so a run with a smaller budget still anneals to the last rate.
    Stepped once per epoch; a function of the epoch count that Lightning checkpoints, so a
    resume continues it."""
    ends = [sum(3**j for j in range(i + 1)) for i in range(stages)]
    if epochs is not None:
        if epochs < 1:
            raise BadValue(f"scheduler.epochs must be >= 1, got {epochs}")
        ends = [end * epochs / ends[-1] for end in ends]

    def factor(epoch: int) -> float:
        # The stage at the epoch's midpoint (the same as `epoch < end` for whole-epoch stages).
        stage = next((i for i, end in enumerate(ends) if epoch + 0.5 < end), stages - 1)
        return 10 ** (-stage / 7)

    return LambdaLR(optimizer, factor)


class BudgetSchedule(L.Callback):
    """Linear warm-up over the first `warmup` of the budget, then a cosine decay from `lr` to
    `final` x `lr` at its end. The budget is whichever of trainer.max_steps / max_epochs and
    trainer.max_time ends the run first: progress is the larger of the two fractions used. With a
    time budget the schedule follows the wall clock, so a recipe for "one hour" anneals fully on
    a slower machine instead of being cut off at a high rate (an epoch-count schedule squeezed
    into max_epochs=300 stopped at epoch 204 of 300 in an hour, and spent half of the hour at its
    last rate).

    The peak rate of each parameter group is kept in it as `initial_lr` (as torch's schedulers do),
    so the optimizer's checkpoint carries it; the step count and Lightning's Timer, which
    checkpoints its elapsed time, say where a resumed run is. Set once per training batch."""

    def __init__(self, warmup: float = 0.0, final: float = 0.01):
        if not 0 <= warmup < 1 or not 0 <= final <= 1:
            raise BadValue(f"BudgetSchedule needs 0 <= warmup < 1 and 0 <= final <= 1, got "
                           f"warmup={warmup}, final={final}")
        self.warmup, self.final = float(warmup), float(final)

    def factor(self, progress: float) -> float:
        """The rate as a fraction of the peak, at `progress` in [0, 1] of the budget."""
        if progress < self.warmup:
            return progress / self.warmup
        decay = (progress - self.warmup) / (1 - self.warmup)
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0)))

    @staticmethod
    def progress(trainer: L.Trainer) -> float:
        fractions = []
        steps = trainer.estimated_stepping_batches
        if math.isfinite(steps) and steps > 0:
            fractions.append(trainer.global_step / steps)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None:
            elapsed = timer.time_elapsed()
            fractions.append(elapsed / max(elapsed + remaining, 1e-9))
        return min(max(fractions, default=0.0), 1.0)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if module.lr_schedulers():
            raise BadValue("two learning-rate schedules: callbacks.lr_budget and scheduler are "
                           "both set; keep one (scheduler=null, or lr_budget=none)")
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.set_rates(trainer)  # before LearningRateMonitor reads them (listed after this)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        self.set_rates(trainer)

    def set_rates(self, trainer: L.Trainer) -> None:
        factor = self.factor(self.progress(trainer))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
