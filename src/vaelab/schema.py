"""Types and ranges of every config value a user sets, checked once where a config is read (the
three entry points, and checkpoint hparams on load). pydantic does the checking and names the key;
the constructors behind the configs trust what passed here."""

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vaelab.errors import BadValue

Count = Annotated[int, Field(ge=1, strict=True)]        # a whole number >= 1 (not 2.5, not true)
Natural = Annotated[int, Field(ge=0, strict=True)]      # >= 0
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


# pydantic's words where ours say more to someone typing overrides (by pydantic's error type)
WHOLE, TRUE_OR_FALSE = "should be a whole number", "should be true or false"
MESSAGES = {"int_type": WHOLE, "int_parsing": WHOLE, "int_from_float": WHOLE,
            "bool_type": TRUE_OR_FALSE, "bool_parsing": TRUE_OR_FALSE,
            "finite_number": "should be a finite number", "literal_error": "should be {expected}",
            "greater_than_equal": "should be >= {ge}", "greater_than": "should be > {gt}",
            "less_than": "should be < {lt}"}


class ConfigError(BadValue):
    """A config value of the wrong type or out of range; the message names each key."""


class Section(BaseModel):
    """A config group: the keys named here are checked, any others pass through."""

    model_config = ConfigDict(extra="allow")


class Prior(Section):
    components: Count | None = None


class Model(Section):
    hidden_dims: list[Count] | None = None
    top_hidden_dims: list[Count] | None = None
    hidden_dim: Count | None = None
    bottom_dim: Count | None = None
    channels: list[Count] | None = None
    latent_map: Count | None = None
    latent_dims: list[Count] | None = None
    depth: Natural | None = None
    prior: Prior | None = None
    codebook_size: Count | None = None
    grid: Count | None = None
    residual_blocks: Natural | None = None
    commitment: Weight | None = None
    decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    dead_code_threshold: Weight | None = None


class Likelihood(Section):
    scale: Literal["global", "pixel"] | Positive | None = None
    init_scale: Positive | None = None
    discretized: bool | None = None
    components: Count | None = None
    min_log_scale: Annotated[float, Field(lt=0, allow_inf_nan=False)] | None = None


class Objective(Section):
    beta: Weight | None = None
    mc_samples: Count | None = None
    warmup_steps: Natural | None = None
    free_bits: Weight | None = None
    alpha: Weight | None = None
    gamma: Weight | None = None
    dataset_size: Count | None = None
    capacity: Weight | None = None
    capacity_steps: Natural | None = None
    variant: Literal["i", "ii"] | None = None
    lambda_od: Weight | None = None
    lambda_d_factor: Weight | None = None
    latent_dim: Count | None = None
    hidden: Count | None = None
    layers: Count | None = None
    adversary_lr: Positive | None = None


class Optimizer(Section):
    lr: Positive | None = None


class Data(Section):
    batch_size: Count | None = None
    eval_batch_size: Count | None = None
    num_workers: Natural | None = None
    image_size: Count | None = None
    channels: Literal[1, 3] | None = None
    val_size: Count | Annotated[float, Field(gt=0, lt=1)] | None = None
    val_fraction: Fraction | None = None
    test_fraction: Fraction | None = None
    binarize: Literal["none", "static", "dynamic"] | None = None
    source: Literal["archive", "generated"] | None = None
    test_size: Count | None = None
    memory_limit_gb: Weight | None = None
    corruption: Literal["gaussian", "saltpepper", "mask"] | None = None
    corruption_strength: Positive | None = None


class Corruption(Section):
    kind: Literal["gaussian", "saltpepper", "mask"] | None = None
    strength: Positive | None = None


class Trainer(Section):
    max_epochs: Annotated[int, Field(ge=-1, strict=True)] | None = None
    max_steps: Annotated[int, Field(ge=-1, strict=True)] | None = None

    @field_validator("max_epochs")
    @classmethod
    def trains_something(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 trains nothing; give at least 1 (or -1 with trainer.max_time)")
        return value


class Evaluation(Section):
    nll_samples: Natural = 0
    chunk: Count = 50
    batch_size: Count = 100
    disentanglement: Literal["full", "quick", "off"] = "full"


class Callback(Section):
    every_n_epochs: Count | None = None
    max_rows: Count | None = None
    span: Positive | None = None
    n_images: Count | None = None
    n: Count | None = None
    pairs: Count | None = None
    steps: Count | None = None
    frame: Literal["prior", "posterior"] | None = None
    method: Literal["pca", "tsne"] | None = None


class Hparams(Section):
    """What a checkpoint holds besides weights: the built groups."""

    model: Model
    likelihood: Likelihood
    objective: Objective
    optimizer: Optimizer | None = None
    latent_dim: Count


class Train(Section):
    latent_dim: Count
    beta: Weight
    mc_samples: Count
    lr: Positive
    seed: int
    pictures_every_n_epochs: Count
    compile: bool | Literal["auto", "reduce-overhead", "max-autotune"]
    flush_denormal: bool = True
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    test: bool
    model: Model
    likelihood: Likelihood
    objective: Objective
    optimizer: Optimizer
    data: Data
    trainer: Trainer
    eval: Evaluation
    callbacks: dict[str, Callback | None] | None = None


class Eval(Section):
    disentanglement: bool | Literal["quick"] = False
    fid: bool = False
    fid_samples: Count = 10000
    nll_samples: Count
    chunk: Count
    batch_size: Count
    limit: Count | None
    seed: int
    split: Literal["train", "val", "test"]
    corruption: Corruption | None = None


class Pictures(Section):
    n: Count | None = None
    steps: Count | None = None
    span: Positive | None = None
    max_rows: Count | None = None
    index: Natural | None = None
    frame: Literal["prior", "posterior"] | None = None
    method: Literal["pca", "tsne"] | None = None
    corruption: Corruption | None = None


class Compress(Section):
    input: str | None
    precision: Annotated[int, Field(ge=4, le=20, strict=True)]
    chunk: Count
    limit: Count | None
    verify: bool
    seed: Natural
    lead: Literal["auto"] | bool


class Decompress(Section):
    file: str | None


PictureName = Literal["samples", "reconstructions", "interpolation", "manifold", "latent_scatter",
                      "traversals", "denoising", "uniform_samples", "code_grids"]
PICTURES = get_args(PictureName)


class Generate(Section):
    pictures: list[PictureName]
    label: Natural | None
    nrow: Count
    seed: int
    split: Literal["train", "val", "test"]
    samples: Pictures
    reconstructions: Pictures
    interpolation: Pictures
    manifold: Pictures
    latent_scatter: Pictures
    traversals: Pictures
    denoising: Pictures | None = None


def plain(cfg: Mapping, schema: type[BaseModel]) -> dict[str, Any]:
    """The keys the schema names, resolved (the rest, e.g. `hydra` or `paths`, is not touched)."""
    return {key: OmegaConf.to_container(cfg[key], resolve=True)
            if isinstance(cfg[key], DictConfig | ListConfig) else cfg[key]
            for key in schema.model_fields if key in cfg}


def validate(cfg: Mapping, schema: type[BaseModel], source: str = "") -> None:
    """Raise ConfigError naming every bad key once (`latent_dim`, not also the `model.latent_dim`
    it is interpolated into); `source` says where the values came from, e.g. a checkpoint."""
    try:
        schema.model_validate(plain(cfg, schema))
    except ValidationError as err:
        problems: dict[tuple[str, str], tuple[str, list[str]]] = {}
        for error in err.errors():
            path = [part for part in error["loc"] if not _is_union_branch(part)]
            key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
            message = MESSAGES.get(error["type"], error["msg"]).format(**error.get("ctx", {}))
            # one line per leaf name and value; a union's branches are its alternatives
            shown = (str(path[-1]) if path else "", repr(error.get("input")))
            first_key, messages = problems.setdefault(shown, (key, []))
            if first_key == key and message not in messages:
                messages.append(message.removeprefix("Value error, "))
        lines = [f"{key}={value}: {' or '.join(messages)}"
                 for (_, value), (key, messages) in problems.items()]
        where = f" in {source}" if source else ""
        if len(lines) == 1:
            raise ConfigError(f"bad config value{where}: {lines[0]}") from None
        raise ConfigError(f"bad config values{where}:\n  " + "\n  ".join(lines)) from None


def _is_union_branch(part) -> bool:
    """pydantic names the union member it tried (`int`, `list[int]`, `constrained-int`)."""
    return isinstance(part, str) and ("[" in part or part in {"int", "float", "bool", "str"}
                                      or part.startswith(("constrained-", "literal", "function")))


def read_config(path: Path) -> DictConfig:
    """A config file that a run left (`.hydra/config.yaml`): a damaged file, a YAML Python tag or
    anything but a mapping is one BadValue naming the file, never a YAML traceback."""
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadValue(f"{path} cannot be read ({first}): it is damaged or was not written by "
                       f"train.py; point run_dir at an intact run dir") from None
    if not isinstance(config, DictConfig):
        raise BadValue(f"{path} holds a {type(config).__name__}, not a config mapping: it is "
                       f"damaged or was not written by train.py")
    return config
