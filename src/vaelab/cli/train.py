"""`python train.py ...` / `vaelab-train ...`: fit, test the best checkpoint, write metrics.json.

Only Hydra and the config check are imported before a config has passed: `--help`, `--cfg` and a
bad value answer without loading torch or Lightning (vaelab.training does the run)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vaelab import schema
from vaelab.cli import collector_paused, config_dir, reports_user_errors


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@reports_user_errors
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.RUN:  # a sweep's job reports its own bad value as a row
        schema.validate(cfg, schema.Train)
    with collector_paused():
        from vaelab import training

    return training.run(cfg)


if __name__ == "__main__":
    main()
