"""Learning-rate schedules that need a formula rather than a torch class."""

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
