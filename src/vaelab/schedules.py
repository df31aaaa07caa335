"""Learning-rate schedules that need a formula rather than a torch class."""

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def iwae_paper(optimizer: Optimizer, stages: int = 8) -> LambdaLR:
    """Burda et al. (2016): for i = 0..stages-1, 3^i epochs at lr x 10^(-i/7) (3280 epochs in
    all for 8 stages), then the last rate. Stepped once per epoch; a function of the epoch
    count that Lightning checkpoints, so a resume continues it."""
    ends = [sum(3**j for j in range(i + 1)) for i in range(stages)]

    def factor(epoch: int) -> float:
        stage = next((i for i, end in enumerate(ends) if epoch < end), stages - 1)
        return 10 ** (-stage / 7)

    return LambdaLR(optimizer, factor)
