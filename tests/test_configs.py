"""Every config group option composes, and the objects it names can be built."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from vaelab import loggers
from vaelab.cli import config_dir
from vaelab.training import build_module

CONF = Path(config_dir())
GROUPS = ["data", "model", "likelihood", "objective", "trainer", "logger", "callbacks", "lr_budget",
          "debug", "experiment"]
BATCH, AUXILIARY = 2, 3.0  # data=image_folder's batch and likelihood.auxiliary
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(compose_train, image_dir, group, option):
    if option in ("image_folder", "seed002_products", "vqvae_images"):
        cfg = compose_train(f"{group}={option}", f"data.path={image_dir}", tiny=False)
    else:
        cfg = compose_train(f"{group}={option}")
    assert cfg.get(group) is not None or group in ("debug", "experiment", "lr_budget")
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    vae = module.vae  # latent_dim is a hierarchy's top layer, a latent grid's channels
    reached = getattr(vae, "top_dim", None) or getattr(vae, "latent_channels", None)
    assert (reached or vae.latent_dim) == cfg.latent_dim
    if group == "trainer":
        assert cfg.trainer._target_ == "lightning.Trainer"
    if group == "logger":  # as train builds them (MLflow's file store needs a switch)
        assert len(loggers.build(cfg.logger.values())) == len(cfg.logger)
    if group == "callbacks":
        switched_on = [c for c in cfg[group].values() if c is not None]  # null: off
        assert switched_on and all(instantiate(c) is not None for c in switched_on)


def test_top_level_knobs_reach_model_objective_and_optimizer(compose_train):
    cfg = compose_train("model=conv", "latent_dim=2", "beta=4", "mc_samples=3", "lr=0.01")
    module = build_module(cfg, instantiate(cfg.data))
    assert module.vae.latent_dim == 2
    assert (module.objective.beta, module.objective.mc_samples) == (4.0, 3)
    assert module.configure_optimizers().param_groups[0]["lr"] == 0.01


def test_reference_experiment_is_the_pytorch_examples_setup(compose_train):
    cfg = compose_train("experiment=mnist_mlp_reference")
    assert cfg.model.hidden_dims == [400] and cfg.latent_dim == 20
    assert cfg.data.binarize == "none" and cfg.trainer.max_epochs == 10
    assert cfg.likelihood._target_.endswith("BernoulliLikelihood")


def test_best_mnist_experiment_anneals_over_its_budget(compose_train):
    from vaelab.objectives import IWAE
    from vaelab.schedules import BudgetSchedule

    cfg = compose_train("experiment=mnist_best", "trainer.max_time=00:00:58:00", tiny=False)
    assert cfg.model.hidden_dims == [200, 200] and cfg.latent_dim == 50
    assert cfg.compile == "auto"
    assert cfg.data.binarize == "dynamic" and cfg.data.batch_size == 100 and cfg.lr == 2e-3
    module = build_module(cfg, instantiate(cfg.data))
    assert isinstance(module.objective, IWAE) and module.objective.mc_samples == 5
    assert not isinstance(module.configure_optimizers(), dict)  # no epoch schedule beside it
    schedule = instantiate(cfg.callbacks.lr_budget)
    assert isinstance(schedule, BudgetSchedule)
    # warm-up over 2% of the budget, then from 2e-3 down to 1e-4 at its end
    assert [schedule.factor(p) for p in (0.01, 0.02, 1.0)] == pytest.approx([0.5, 1.0, 0.05])


def test_gpu_recipe_is_mnist_best_at_batch_1000_with_cuda_graphs(compose_train):
    gpu, cpu = (compose_train(f"experiment={name}", tiny=False)
                for name in ("mnist_gpu", "mnist_best"))
    assert (gpu.trainer.accelerator, gpu.compile) == ("gpu", "reduce-overhead")
    assert (gpu.data.batch_size, gpu.lr) == (1000, 4e-3)
    for key in ("model", "objective", "likelihood", "latent_dim", "mc_samples"):
        assert gpu[key] == cpu[key], key
    assert {**gpu.optimizer, "lr": 4e-3} == {**cpu.optimizer, "lr": 4e-3}
    assert gpu.callbacks.lr_budget == cpu.callbacks.lr_budget
    assert gpu.data.binarize == cpu.data.binarize == "dynamic"


def test_image_folders_default_to_the_conv_net_with_the_pixel_window(compose_train, image_dir):
    """The Keras conv (dense 16, no norm) at batch 64 made grey blobs of 300 emoji in 30 epochs;
    the grid of latents, the 8-bit mixture with its pixel window, the neighbour predictions, the
    z-only mixture, the batch and the decaying rate were chosen by validation bits/dim and
    reconstruction error (the records image_density_val, image_density_window_val,
    image_density_defaults_val and image_density_predictors_val)."""
    cfg = compose_train("data=image_folder", f"data.path={image_dir}", tiny=False)
    assert cfg.model._target_ == "vaelab.models.ConvVAE"
    assert (cfg.model.batch_norm, cfg.model.latent_map, cfg.data.batch_size) == (True, 16, BATCH)
    assert cfg.likelihood._target_ == "vaelab.likelihoods.LogisticMixtureLikelihood"
    assert (cfg.likelihood.context, cfg.likelihood.auxiliary) == (5, AUXILIARY)
    assert cfg.likelihood.predictors
    assert cfg.callbacks.lr_budget._target_ == "vaelab.schedules.BudgetSchedule"
    mixture = compose_train("data=image_folder", f"data.path={image_dir}", "likelihood=dlogistic",
                            "lr_budget=none", tiny=False)
    assert (mixture.likelihood.context, mixture.likelihood.auxiliary) == (0, 0)
    assert not mixture.likelihood.predictors
    assert mixture.callbacks.lr_budget is None
    assert compose_train().callbacks.lr_budget is None  # MNIST keeps a constant rate
    chosen = compose_train("data=image_folder", f"data.path={image_dir}", "model=mlp", tiny=False)
    assert chosen.model._target_ == "vaelab.models.MLPVAE"
    products = compose_train("experiment=seed002_products", f"data.path={image_dir}", tiny=False)
    assert products.model.hidden_dim == 512
