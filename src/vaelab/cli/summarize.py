"""`vaelab-summarize sweep_dir=outputs/train/multiruns/<time>`: the sweep's tables and plot."""

import hydra
from omegaconf import DictConfig

from vaelab.cli import config_dir
from vaelab.sweeps import summarize


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="summarize")
def main(cfg: DictConfig) -> None:
    summarize(cfg.sweep_dir)


if __name__ == "__main__":
    main()
