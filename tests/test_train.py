"""Training runs end to end on tiny generated data: outputs, logged numbers, checkpoints."""

import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vaelab.module import VAEModule
from vaelab.schedules import BudgetSchedule
from vaelab.training import train, warn_slow_switches

CPU = "trainer.accelerator=cpu"


MODELS = [(m, lik) for m in ("mlp", "conv") for lik in ("bernoulli", "gaussian")] + [
    ("cvae", "bernoulli"), ("cvae_conv", "gaussian"), ("vamp", "bernoulli"), ("hvae", "gaussian")]


@pytest.mark.parametrize("model, likelihood", MODELS)
def test_fast_dev_run(compose_train, model, likelihood):
    cfg = compose_train(f"model={model}", f"likelihood={likelihood}", "debug=fdr")
    metrics = train(cfg)
    for stage in ("train", "val", "test"):
        for name in ("recon", "kl", "elbo", "nelbo"):
            assert math.isfinite(metrics[f"{stage}/{name}"]), f"{stage}/{name}"
    assert metrics["test/nelbo"] == pytest.approx(-metrics["test/elbo"])
    assert metrics["test/kl"] >= 0


def scalars(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def logged_hparams(events: EventAccumulator) -> dict:
    """The HParams tab's hyperparameters of a run, as TensorBoard reads them."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    for meta in events.summary_metadata.values():
        if meta.plugin_data.plugin_name != "hparams":
            continue
        data = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)
        if data.HasField("session_start_info"):
            return {k: v.number_value if v.HasField("number_value") else v.string_value
                    for k, v in data.session_start_info.hparams.items()}
    raise AssertionError("no hparams in the run's events")


def test_a_short_run_writes_checkpoints_events_and_metrics(compose_train, tmp_path):
    cfg = compose_train(CPU, "trainer.max_epochs=2", "objective.beta=2",
                        "logger=[tensorboard,csv]")
    returned = train(cfg)

    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert not Path(metrics["best_checkpoint"]).is_absolute()  # the run dir may move
    assert (tmp_path / metrics["best_checkpoint"]).is_file()
    for name in ("loss", "recon", "kl", "elbo", "nelbo"):
        assert math.isfinite(metrics[f"test/{name}"])
    # beta weights the loss, never the logged KL.
    assert metrics["test/loss"] == pytest.approx(metrics["test/recon"] + 2 * metrics["test/kl"],
                                                 rel=1e-5)
    assert metrics["test/nelbo"] == pytest.approx(metrics["test/recon"] + metrics["test/kl"],
                                                  rel=1e-5)
    assert returned["val/nelbo"] == metrics["val/nelbo"]

    events = scalars(tmp_path)
    tags = set(events.Tags()["scalars"])
    for stage in ("train", "val", "test"):  # the same names in every stage
        assert {f"{stage}/{n}" for n in ("loss", "recon", "kl", "elbo", "nelbo")} <= tags
    assert len(events.Scalars("val/loss")) == 2  # one point per epoch
    assert "hp/test/nelbo" in tags and "hp/val/loss" in tags  # the HParams tab's metric columns
    hparams = logged_hparams(events)
    assert hparams["objective.beta"] == 2 and "beta" not in hparams  # what was built, no copy
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_checkpoint_loads_safely_without_hydra(compose_train, tmp_path):
    cfg = compose_train(CPU, "model=conv", "latent_dim=2", "trainer.max_epochs=1")
    train(cfg)
    path = tmp_path / "checkpoints" / "last.ckpt"
    raw = torch.load(path, weights_only=True)  # only tensors and plain containers inside
    assert raw["hyper_parameters"]["latent_dim"] == 2
    module = VAEModule.load_from_checkpoint(path, weights_only=True, map_location="cpu")
    assert module.vae.latent_dim == 2 and type(module.vae).__name__ == "ConvVAE"
    state = raw["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert module(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)


class LossOnly:
    """The least an objective may return: a dict with `loss`."""

    def __call__(self, vae, x, context=None, step=0):
        q = vae.encode(x, context)
        z = q.rsample()
        return {"loss": (-vae.decode(z, context).log_prob(x) + vae.kl(q, z[None])[0]).mean()}


def test_an_objective_needs_to_return_only_its_loss(compose_train, tmp_path):
    metrics = train(compose_train(CPU, "trainer.max_epochs=1", "~objective",
                                  "+objective._target_=tests.test_train.LossOnly",
                                  "+optimized_metric=val/loss"))
    assert {"train/loss", "val/loss", "test/loss"} <= set(metrics)
    assert not any(k.endswith("/nelbo") for k in metrics)
    assert "epoch000" in json.loads((tmp_path / "metrics.json").read_text())["best_checkpoint"]


@pytest.mark.parametrize("flush", [True, False])
def test_subnormal_floats_are_flushed_to_zero_on_request(compose_train, flush):
    subnormal = torch.tensor([1e-39])
    try:
        train(compose_train("debug=fdr", f"flush_denormal={str(flush).lower()}"))
        assert bool((subnormal * 1.0 == 0).item()) is flush
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("native, warned", [(True, False), (False, True)])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(compose_train, monkeypatch, caplog,
                                                            native, warned):
    monkeypatch.setattr("vaelab.training.matmul_gflops",
                        lambda dtype: 500.0 if dtype == torch.bfloat16 else 200.0)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    warn_slow_switches(compose_train(CPU, "trainer.precision=bf16-mixed"))
    assert caplog.text.count("without AVX512-BF16") == int(warned)
    caplog.clear()
    warn_slow_switches(compose_train(CPU))  # float32, eager: never a warning
    assert not caplog.text


@pytest.mark.parametrize("bf16, warned", [(146.0, True), (530.0, False)])
def test_bf16_warns_where_its_matmul_measures_slower_than_float32(compose_train, monkeypatch,
                                                                  caplog, bf16, warned):
    """CPU flags alone are not enough: one PyTorch release ran bf16 slower on a bf16 CPU."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr("vaelab.training.matmul_gflops",
                        lambda dtype: bf16 if dtype == torch.bfloat16 else 245.0)
    warn_slow_switches(compose_train(CPU, "trainer.precision=bf16-mixed"))
    assert caplog.text.count("146 GFLOP/s here against 245 in float32") == int(warned)
    assert len(caplog.records) == int(warned)


def test_matmul_gflops_measures_this_cpu():
    from vaelab.training import matmul_gflops

    assert matmul_gflops(torch.float32, repeats=20) > 1.0


@pytest.mark.parametrize("capability, setting, reasons", [
    ("AVX2", "true", ["43 s against 7 s"]),
    ("AVX2", "reduce-overhead", ["CUDA graphs need a GPU", "43 s against 7 s"]),
    ("AVX512", "true", []),  # measured faster there: nothing to warn about
    ("AVX512", "reduce-overhead", ["CUDA graphs need a GPU"])])
def test_compile_on_the_cpu_warns_with_what_it_measured_on_such_a_cpu(
        compose_train, monkeypatch, caplog, capability, setting, reasons):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    warn_slow_switches(compose_train(CPU, f"compile={setting}"))
    assert len(caplog.records) == int(bool(reasons))
    assert all(reason in caplog.text for reason in reasons)


@pytest.mark.parametrize("capability, compiled", [("AVX512", True), ("AVX2", False)])
def test_compile_auto_compiles_only_where_it_measured_faster(compose_train, monkeypatch, caplog,
                                                             capability, compiled):
    from vaelab.training import compile_setting

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cfg = compose_train(CPU, "compile=auto")
    assert compile_setting(cfg) is compiled
    caplog.set_level("INFO")
    warn_slow_switches(cfg)
    assert ("compile=auto: off" in caplog.text) is not compiled
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("setting, on_cpu, mode, options", [
    (False, True, "not compiled", None),
    (True, False, None, None),
    ("reduce-overhead", False, "reduce-overhead", None),
    # on the CPU: inductor draws noise with torch's generator; CUDA graphs are left out
    (True, True, None, {"fallback_random": True}),
    ("reduce-overhead", True, None, {"fallback_random": True}),
    ("max-autotune", True, None, {"max_autotune": True, "coordinate_descent_tuning": True,
                                  "fallback_random": True})])
def test_compile_setting_reaches_torch_compile(compose_train, monkeypatch, setting, on_cpu, mode,
                                               options):
    from hydra.utils import instantiate

    from vaelab.training import build_module, compile_objective

    cfg = compose_train(CPU)
    module = build_module(cfg, instantiate(cfg.data))
    seen = {"mode": "not compiled", "options": None}

    def fake_compile(fn, mode=None, options=None, **_):
        seen.update(mode=mode, options=options)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_objective(module, setting, on_cpu)
    assert seen == {"mode": mode, "options": options}


def test_compiled_objective_on_the_cpu_draws_the_eager_noise(compose_train):
    """fallback_random: the compiled step draws its latents from torch's generator, so a seeded
    compiled run sees the same noise as an eager one (inductor's own kernel drew other numbers,
    and took 1.2 ms of a 4.8 ms batch-100 IWAE step)."""
    from hydra.utils import instantiate

    from vaelab.training import build_module, compile_objective

    cfg = compose_train(CPU, "objective=iwae", "mc_samples=3")
    module = build_module(cfg, instantiate(cfg.data))
    x = torch.rand(4, *module.vae.data_shape)
    torch.manual_seed(1)
    eager = module.objective(module.vae, x)
    compile_objective(module, True, on_cpu=True)
    torch.manual_seed(1)
    compiled = module.objective(module.vae, x)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-5)


BUDGET = "callbacks.lr_budget={_target_:vaelab.schedules.BudgetSchedule,warmup:0.25,final:0.1}"


def test_budget_schedule_warms_up_then_anneals_over_the_budget(compose_train, tmp_path):
    train(compose_train(CPU, BUDGET, "trainer.max_epochs=4", "lr=0.01"))  # 5 steps an epoch
    events = scalars(tmp_path)
    lrs = [s.value for s in events.Scalars("lr-Adam")]  # at each epoch's start
    # progress 0, 1/4, 1/2, 3/4: warm-up from 0 to the peak, then cosine towards 0.1 x peak
    expected = [0.0, 1.0, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.25]
    assert lrs == pytest.approx([0.01 * f for f in expected], abs=1e-7)
    epochs = [s.value for s in events.Scalars("time/epoch_s")]
    validations = [s.value for s in events.Scalars("time/val_s")]
    assert len(epochs) == 4 and all(0 < v < e for v, e in zip(validations, epochs, strict=True))
    assert all(s.value > 0 for s in events.Scalars("time/step_ms"))


def test_budget_schedule_follows_the_clock_and_refuses_a_second_schedule(compose_train):
    trainer = L.Trainer(max_epochs=-1, max_steps=1000, max_time={"seconds": 100},
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    assert BudgetSchedule.progress(trainer) == 0.0
    timer.load_state_dict({"time_elapsed": {"train": 60.0}})  # as a resumed run's Timer
    assert BudgetSchedule.progress(trainer) == pytest.approx(0.6)
    timer.load_state_dict({"time_elapsed": {"train": 130.0}})
    assert BudgetSchedule.progress(trainer) == 1.0
    with pytest.raises(ValueError, match="two learning-rate schedules"):
        train(compose_train(CPU, BUDGET, "trainer.max_epochs=1", "scheduler={_target_:torch."
                            "optim.lr_scheduler.StepLR,_partial_:true,step_size:1}"))


def test_the_cuda_probe_is_asked_once_on_a_machine_without_a_gpu(monkeypatch):
    from vaelab.training import cache_cuda_probe

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as importing Lightning sets it
    cache_cuda_probe()
    no_gpu = torch.cuda.device_count() == 0
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == ("0" if no_gpu else "1")
    assert torch.cuda.is_available() is not no_gpu


class RecordTrainer(L.Callback):
    """Keeps what the run's trainer used for profiling and for its progress bar."""

    seen: list = []

    def on_train_start(self, trainer, module):
        RecordTrainer.seen.append((trainer.profiler, trainer.progress_bar_callback))


@pytest.mark.parametrize("debug, profiler", [(None, "NoProfiler"), ("profiler", "SimpleProfiler")])
def test_the_run_profiles_only_when_asked_and_redraws_its_bar_ten_times_a_second(
        compose_train, debug, profiler):
    """Lightning's per-hook profiler contexts and its 100-a-second bar cost a step time."""
    RecordTrainer.seen.clear()
    cfg = compose_train(CPU, "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                        *([f"debug={debug}"] if debug else []),
                        "+callbacks.record._target_=tests.test_train.RecordTrainer")
    train(cfg)
    (used, bar), = RecordTrainer.seen
    assert type(used).__name__ == profiler
    assert type(bar).__name__ == "RichProgressBar" and bar.refresh_rate == 10
