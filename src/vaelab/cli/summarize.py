"""`vaelab-summarize sweep_dir=outputs/train/multiruns/<time> [logger=[tensorboard,mlflow]]`: the
sweep's tables and plots, also sent to the chosen loggers."""

import hydra
from omegaconf import DictConfig

from vaelab.cli import config_dir, reports_user_errors
from vaelab.sweeps import summarize, sweep_logger_specs


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="summarize")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    summarize(cfg.sweep_dir, sweep_logger_specs(cfg, cfg.sweep_dir))


if __name__ == "__main__":
    main()
