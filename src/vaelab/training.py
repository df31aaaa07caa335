"""What one `python train.py` run does: build the parts, fit, test the best checkpoint, score it,
write metrics.json. Imported only once the config has passed (cli/train.py), so that `--help`
and config errors answer without loading torch and Lightning."""

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.profilers import PassThroughProfiler
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaelab import evaluation, loggers, runs, schema, scores
from vaelab.checkpointing import (
    PREVIOUS_LAST,
    check_same_architecture,
    read_checkpoint,
    remove_partial_files,
)
from vaelab.cli import LAUNCH_DDP_ENV, resume_checkpoint, write_atomically
from vaelab.errors import BadValue
from vaelab.module import VAEModule
from vaelab.sweeps import ERROR_FILE

log = logging.getLogger(__name__)

# What TensorBoard's HParams tab lists for every run, so that runs compare side by side: the
# groups as built (objective.beta, not the top-level `beta` that only feeds it by default).
HPARAM_GROUPS = ("model", "likelihood", "objective", "optimizer", "scheduler")
HPARAM_KEYS = ("latent_dim", "seed", "compile", "data._target_", "data.dataset", "data.binarize",
               "data.batch_size", "data.image_size", "trainer.max_epochs", "trainer.precision")


def plain(cfg: DictConfig | None) -> Any:
    """Resolved plain containers: what a checkpoint may hold (no OmegaConf objects)."""
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def build_module(cfg: DictConfig, datamodule, module_class=VAEModule) -> VAEModule:
    """The module for this config and data (its shape and, for conditional models, classes)."""
    labelled = cfg.model.get("conditional") or cfg.model.get("conditional_prior")
    if labelled and getattr(datamodule, "unlabelled", 0):
        raise BadValue(
            f"model.conditional=true needs a class for every image, but {datamodule.unlabelled} "
            f"images of data.path sit directly in the folder (no class): move them into class "
            f"subfolders, or use an unconditional model")
    scheduler = plain(cfg.scheduler)
    if scheduler is not None:  # plateau schedulers watch the same step-free metric
        scheduler.setdefault("monitor", cfg.optimized_metric)
    return module_class(model=plain(cfg.model), likelihood=plain(cfg.likelihood),
                     objective=plain(cfg.objective), optimizer=plain(cfg.optimizer),
                     scheduler=scheduler, data_shape=list(datamodule.shape),
                     latent_dim=cfg.latent_dim,
                     num_classes=getattr(datamodule, "num_classes", None))


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"objective": {"beta": 4}} -> {"objective.beta": 4}."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if key != "_partial_"
                for k, v in flatten(f"{prefix}.{key}", item).items()}
    return {prefix: str(value) if isinstance(value, list) else value}


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The resolved groups as built, flattened, beside the run-level keys."""
    values: dict[str, Any] = {}
    for group in HPARAM_GROUPS:
        values.update(flatten(group, plain(cfg.get(group))))
    values.update({key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS})
    return {key: str(v) if isinstance(v, list | dict) else v for key, v in values.items()
            if v is not None}


def evaluate_test_set(module: VAEModule, datamodule, spec: DictConfig) -> dict[str, float]:
    """The importance-sampled evaluation of `vaelab-eval`, on the tested (best) weights."""
    module.eval()
    scores = evaluation.score(module.vae, runs.batches(datamodule.test_set, spec.batch_size),
                              spec.nll_samples, spec.chunk)
    results = evaluation.summary(scores, module.vae, spec.nll_samples)
    log.info("test NLL (K=%d): %.3f nats", spec.nll_samples, results["eval/nll"])
    return results


def epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The epoch metrics (`stage/key`), not the per-step or progress-bar-only values."""
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if "/" in k and not k.startswith("train_step/")}


def train(cfg: DictConfig) -> dict[str, float]:
    """Check the config and any checkpoint to resume, build the parts, then fit and test."""
    schema.validate(cfg, schema.Train)
    torch.set_flush_denormal(cfg.get("flush_denormal", True))
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("vqvae_run"):  # stage two of a VQ-VAE: its prior, on the stage-one run's codes
        from vaelab import prior_stage

        cfg, datamodule, module = prior_stage.build(cfg, output_dir)
    else:
        datamodule = instantiate(cfg.data)
        module = build_module(cfg, datamodule)
    compile_objective(module, compile_setting(cfg), on_cpu=not on_gpu(cfg.trainer))
    ckpt_path = resume_checkpoint(cfg.get("resume"), cfg.get("ckpt_path"))
    resume_step = None
    if ckpt_path:  # refuse a wrong or unsafe checkpoint before any training
        checkpoint = read_checkpoint(ckpt_path)
        check_same_architecture(checkpoint, dict(module.hparams), ckpt_path)
        refuse_finished(checkpoint, cfg.trainer, output_dir)
        resume_step = checkpoint.get("global_step")
        remove_partial_files(Path(ckpt_path).parent)
        log.info("resuming from %s at step %s", ckpt_path, resume_step)
    check_accelerator(cfg.trainer)
    warn_slow_switches(cfg)
    cache_cuda_probe()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    run_loggers = loggers.build((cfg.get("logger") or {}).values(), resume_step)
    no_profiler = {} if cfg.trainer.get("profiler") else {"profiler": NoProfiler()}
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[c for c in callbacks if c],
                                     logger=run_loggers or False, **no_profiler)
    try:
        return fit_and_test(cfg, trainer, module, datamodule, ckpt_path)
    finally:
        loggers.close(run_loggers)


def fit_and_test(cfg: DictConfig, trainer: L.Trainer, module: VAEModule, datamodule,
                 ckpt_path: str | None) -> dict[str, Any]:
    """Fit, test the best checkpoint, score it, log hparams with the final metrics, write
    metrics.json."""
    output_dir = Path(cfg.paths.output_dir)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath:
        # fit ended well: last.ckpt is good, the fallback kept for a NaN is not needed
        (Path(trainer.checkpoint_callback.dirpath) / PREVIOUS_LAST).unlink(missing_ok=True)
    metrics = epoch_metrics(trainer)
    metrics["time/train_s"] = time.perf_counter() - started
    metrics["torch_threads"] = torch.get_num_threads()
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        tested = epoch_metrics(trainer)
        if not any(k.startswith("test/") for k in tested):
            log.warning("the test split is empty: no test/* metrics (data.test_fraction, or a "
                        "test/ folder, gives it images)")
        metrics.update(tested)
        # relative to the run dir, so a copied or moved run dir finds its own checkpoint
        metrics["best_checkpoint"] = relative_to(best, output_dir) if best else ""

    if trainer.is_global_zero and cfg.get("test") and cfg.eval.nll_samples:
        metrics.update(evaluate_test_set(module, datamodule, cfg.eval))
    if trainer.is_global_zero and cfg.eval.get("disentanglement", "off") != "off" \
            and scores.has_factors(datamodule):
        started = time.perf_counter()
        found = scores.of_model(module.vae, datamodule, cfg.seed,
                                quick=cfg.eval.disentanglement == "quick")
        metrics.update(found)
        for logger in trainer.loggers:  # as scalars too, at the last step
            logger.log_metrics(found, step=trainer.global_step)
        log.info("disentanglement scores in %.0f s: %s", time.perf_counter() - started,
                 {k.split("/")[1]: round(v, 3) for k, v in found.items()})
    if trainer.is_global_zero:
        loggers.log_final(trainer.loggers, hparams(cfg), metrics, trainer.global_step)
        write_metrics(output_dir / "metrics.json", metrics)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
            log.info("%s", finish_block(output_dir, metrics, module.vae.likelihood.discrete))
    return metrics


def finish_block(run: Path, metrics: dict[str, Any], discrete: bool) -> str:
    """What a finished run leaves and what to run next, in a few lines."""
    run = Path(relative_to(str(run), Path.cwd()))
    tested = "  ".join(f"{key} {metrics[f'test/{key}']:.2f}"
                       for key in ("nelbo", "recon", "kl", "bpd") if f"test/{key}" in metrics)
    if "eval/nll" in metrics:
        tested += f"  nll {metrics['eval/nll']:.2f}"
    if tested and not discrete:
        tested += ("\n               (a density of continuous pixels, so the nats can be "
                   "negative; bpd compares across data)")
    lines = [f"run finished: {run}",
             f"  test (nats)  {tested or 'not tested (test=false)'}"]
    if (run / "tensorboard").is_dir():
        lines.append(f"  look         tensorboard --logdir {run}")
    if (run / "checkpoints").is_dir():
        lines[1:1] = [f"  best ckpt    {metrics.get('best_checkpoint') or 'checkpoints/last.ckpt'}"]
        lines += [f"  sample       vaelab-generate run_dir={run}",
                  f"  evaluate     vaelab-eval run_dir={run}   (importance-sampled NLL, K=5000)"]
    return "\n".join(lines)


def check_accelerator(trainer: DictConfig) -> None:
    """trainer=gpu or trainer=ddp on a machine without a GPU: say so plainly, before Lightning
    buries it in an instantiation error."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not (CUDAAccelerator.is_available()
                                               or MPSAccelerator.is_available()):
        why = ("this PyTorch build has no CUDA" if torch.version.cuda is None
               else f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        raise BadValue(f"trainer.accelerator={accelerator}: no GPU was found ({why}). Leave "
                       f"trainer=gpu/ddp out to train on the CPU (trainer=default picks what "
                       f"there is), or use trainer=ddp_cpu for several CPU processes.")


def on_gpu(trainer: DictConfig) -> bool:
    """Whether the run trains on a CUDA GPU (trainer=default's `auto` picks one if present)."""
    return trainer.get("accelerator") != "cpu" and torch.cuda.is_available()


def compile_objective(module: VAEModule, setting: bool | str | None, on_cpu: bool) -> None:
    """compile=true: torch.compile's default mode; a name is the mode (reduce-overhead: CUDA
    graphs). Only the objective is compiled: the nets keep their names in checkpoints.
    On the CPU, inductor draws the latents' noise with torch's generator (`fallback_random`),
    as eager does: its own per-element Philox kernel took 1.2 ms of a batch-100 IWAE step on a
    2-core AVX-512 CPU, and made the compiled step slower than the eager one (docs/speed.md)."""
    if not setting:
        return
    mode = None if setting is True else setting
    if not on_cpu:
        module.objective.compile(mode=mode)
        return
    options = {k: v for k, v in torch._inductor.list_mode_options(mode or "default").items()
               if not k.startswith("triton.")}  # CUDA graphs need a GPU
    module.objective.compile(options=options | {"fallback_random": True})


class NoProfiler(PassThroughProfiler):
    """Lightning's profiler when none is asked for (debug=profiler asks for one), without a
    context manager per call: Lightning enters `profile()` around every hook of every callback,
    about 100 times a step with vaelab's callbacks, and a fresh generator-based context each
    time cost 0.2 to 0.27 ms of an 8 ms `mnist_best` step on 2 CPU cores (docs/speed.md)."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return self._nothing


def cache_cuda_probe() -> None:
    """Lightning makes torch ask NVML whether there is a GPU (it cannot poison a later fork),
    and torch does not cache that answer before CUDA starts: Adam's step asks it every step,
    which on a machine without an NVIDIA driver is a failed dlopen each time (65 us a call
    on a 2-core CPU, 2% of a batch-20 step). With no GPU there is no CUDA to poison, so use
    torch's own probe, which is asked once."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and \
            torch.cuda.device_count() == 0:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def warn_slow_switches(cfg: DictConfig) -> None:
    """The fast switches, where they measured slower on the CPU (docs/speed.md): say so once,
    with the reason; the run goes on as asked."""
    if on_gpu(cfg.trainer):
        return
    precision = str(cfg.trainer.get("precision", "32-true"))
    if "bf16" in precision:
        is_native = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if is_native is not None and not is_native() and not (amx and amx()):
            log.warning("trainer.precision=%s on a CPU without AVX512-BF16 or AMX: bfloat16 is "
                        "emulated here and ran 3 to 13x slower than float32 on such CPUs. "
                        "Leave trainer.precision at 32-true on this machine.", precision)
        else:
            bf16, f32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
            if bf16 < f32:
                log.warning("trainer.precision=%s: a bfloat16 matmul ran at %.0f GFLOP/s here "
                            "against %.0f in float32 (PyTorch %s, measured now), so bfloat16 "
                            "autocast will likely slow this run down. Leave trainer.precision "
                            "at 32-true on this machine.", precision, bf16, f32,
                            torch.__version__)
    setting = compile_setting(cfg)
    if cfg.get("compile") == "auto" and not setting:
        log.info("compile=auto: off, on a CPU without AVX-512 a compiled MLP epoch took 43 s "
                 "against 7 s eager (docs/speed.md).")
    elif setting and not avx512():
        why = ("on a CPU without AVX-512 a compiled MLP epoch took 43 s against 7 s eager; "
               "leave compile off on this machine")
        if setting == "reduce-overhead":
            why = f"CUDA graphs need a GPU, so it compiles as compile=true does; {why}"
        log.warning("compile=%s: %s (docs/speed.md).", str(setting).lower(), why)
    elif setting == "reduce-overhead":
        log.warning("compile=reduce-overhead: CUDA graphs need a GPU, so it compiles as "
                    "compile=true does (docs/speed.md).")


def avx512() -> bool:
    """Whether PyTorch's CPU kernels (and inductor's) use AVX-512 here."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def compile_setting(cfg: DictConfig) -> bool | str:
    """`compile`, with `auto` decided by what was measured (docs/speed.md): on for a GPU
    (1.45x faster steps on an H100) and for a CPU with AVX-512 (10 to 11% faster steps, for
    about 25 s of compiling from a cold cache), off for other CPUs (6x slower epochs)."""
    setting = cfg.get("compile") or False
    if setting != "auto":
        return setting
    return on_gpu(cfg.trainer) or avx512()


def matmul_gflops(dtype: torch.dtype, repeats: int = 200) -> float:
    """GFLOP/s of an MLP layer's matmul (128x784 by 784x400) on this CPU, in about 0.1 s.
    Whether bfloat16 pays is a measurement, not a CPU flag: with AVX512-BF16 one PyTorch
    release ran it at 530 GFLOP/s against 172 in float32, a later one at 146 against 245."""
    a, b = torch.full((128, 784), 0.5, dtype=dtype), torch.full((784, 400), 0.25, dtype=dtype)
    for _ in range(10):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 128 * 784 * 400 * repeats / (time.perf_counter() - start) / 1e9


def refuse_finished(checkpoint: dict[str, Any], trainer: DictConfig, run: Path) -> None:
    """A resume with nothing left to train would only re-test and rewrite a finished run's
    metrics.json: refuse it, and say how to train on or get more numbers."""
    epochs = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"]
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps") or -1
    done = (max_epochs not in (None, -1) and epochs >= max_epochs) or (
        max_steps > 0 and checkpoint.get("global_step", 0) >= max_steps)
    if done and (run / "metrics.json").is_file():
        raise BadValue(
            f"{run} has already finished: its checkpoint trained {epochs} epochs "
            f"({checkpoint.get('global_step')} steps) and metrics.json holds its numbers. Give "
            f"trainer.max_epochs={epochs + 1} or more to train on, or run vaelab-eval "
            f"run_dir={run} for importance-sampled numbers; metrics.json is left as it is.")


def relative_to(path: str, folder: Path) -> str:
    """`path` relative to `folder` when it lies inside it, else as it is."""
    try:
        return str(Path(path).resolve().relative_to(folder.resolve()))
    except ValueError:
        return path


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """metrics.json, merged into the one a resumed run already has (a resume that trains no
    further epochs must not erase the train/val numbers and training time sweeps read), and
    written atomically."""
    merged = dict(metrics)
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
        merged = {**previous, **metrics}
        merged["time/train_s"] = previous.get("time/train_s", 0.0) + metrics["time/train_s"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(merged, indent=2, sort_keys=True))
    log.info("metrics written to %s", path)


def prepare_multirun_job(cfg: DictConfig) -> None:
    """Inside a multirun job: share the CPU threads among parallel joblib jobs, and make DDP
    ranks join this one job (Lightning restarts `sys.argv`, which holds the whole sweep, in
    `hydra.run.dir`, which is not the job's folder)."""
    hydra_cfg = HydraConfig.get()
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))
    if "joblib" in launcher.lower():
        jobs = hydra_cfg.launcher.n_jobs
        jobs = os.cpu_count() if jobs in (None, -1) else jobs
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    # Lightning leaves the previous job's process group and rank variables behind, which would
    # make this job believe its ranks were started for it: back to what the sweep was given.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in LAUNCH_DDP_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sys.argv = [sys.argv[0], *(o for o in hydra_cfg.overrides.task
                               if not o.startswith("hparams_search=")), "hydra.mode=RUN"]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def run(cfg: DictConfig) -> float | None:
    """One run, or one job of a multirun: a failed job writes its error for the sweep's summary
    and returns NaN, so that the sweep goes on."""
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return train(cfg).get(cfg.optimized_metric)
    prepare_multirun_job(cfg)
    try:
        return train(cfg).get(cfg.optimized_metric)
    except Exception as err:  # noqa: BLE001 - one failed job must not stop the sweep
        log.exception("job failed; the sweep goes on and its summary lists the error")
        error = {"error": f"{type(err).__name__}: {err}".strip()[:2000]}
        (Path(cfg.paths.output_dir) / ERROR_FILE).write_text(json.dumps(error, indent=2))
        return float("nan")
