"""The run configuration: one YAML file with sections model, data, train, optimizer, deepspeed.

    model:      {config: NAME_OR_PATH, <any HopeConfig field>: override}
    data:       DataConfig         where the tokens come from (one dataset or a weighted mixture), sequence length
    train:      TrainConfig        steps, schedule, checkpoints, logging
    optimizer:  train.optim.OptimizerConfig (owned by the optimizer code; filled here)
    deepspeed:  DeepSpeed's own config dict, passed to deepspeed.initialize (checked first by
                train/deepspeed_config.py: DeepSpeed's own parser, what the trainer relies on)

Everything is checked before any process group starts. A bad value stops with ONE message that
names the file, the key and what was expected:
    configs/train/x.yaml: train.max_steps: expected a positive int, got 'ten'
`--set section.key=value` overrides any field; values are parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.errors import DataError
from data_pipeline.mixture import slot_counts
from data_pipeline.shards import MANIFEST_NAME
from train.optim.config import OptimizerConfig, OptimizerConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("cosine", "wsd", "constant")
WANDB_MODES = ("disabled", "offline", "online")


class ConfigError(ValueError):
    """The run configuration is invalid; the message names file, key and what was expected."""


@dataclass
class ModelSection:
    config: str = "tiny"  # NAME (configs/model/NAME.yaml) or a path to a model YAML
    overrides: dict[str, Any] = field(default_factory=dict)  # any HopeConfig field


@dataclass
class DataConfig:
    path: str = "default"  # a directory of shards (any fsspec path) or "default" (embedded corpus)
    mixture: dict[str, float] = field(default_factory=dict)  # or {directory: weight}: datasets mixed by weight
    cache_dir: str = ".cache/hope-data"  # where `default` is prepared (once)
    vocab_size: int = 4096  # tokenizer size when preparing `default`
    seq_len: int = 64
    # resume a checkpoint whose data differs (shards added, a new mixture): its position carries over
    allow_changed_data: bool = False
    # 0: each epoch in a random order over the whole dataset; K: a window of K shards at a time (the
    # shards in a random order, the samples of each window shuffled), so that a remote dataset's
    # local cache holds 3 windows (the one before, the current one, the next), not the dataset
    shuffle_window_shards: int = 0


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3  # the last K complete checkpoints are kept
    portable_checkpoint: bool = True  # also save optimizer_portable.pt: resume on any number of ranks
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays to min_lr_ratio
    min_lr_ratio: float = 0.1
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    progress_bar: bool = True
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "hope-train"
    wandb_name: str | None = None
    peak_tflops: float | None = None  # device peak for MFU; None = known GPUs' dense bf16 peak
    compile: bool = False  # torch.compile every block of the model (train/compile.py); the first step compiles
    hf_export_every: int = 0  # RUN_DIR/hf/step-N every N steps (a multiple of checkpoint_every) and at the end; 0 = never
    hf_export_dtype: str = "bf16"  # bf16 | fp32
    hf_push_to_hub: str | None = None  # ORG/NAME: each periodic export also goes to its branch step-N


@dataclass
class RunConfig:
    model: ModelSection
    data: DataConfig
    train: TrainConfig
    optimizer: OptimizerConfig
    deepspeed: dict[str, Any]
    source: str = "<config>"  # the YAML file it came from, for messages

    def to_dict(self) -> dict:
        """The resolved config, as YAML-able plain data (written beside every checkpoint)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in ("data", "train", "optimizer")}
        out["model"] = {"config": self.model.config, **self.model.overrides}
        out["deepspeed"] = self.deepspeed
        return out


# ---------------------------------------------------------------------------- generic loader
def _describe(tp) -> str:
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str, source: str):
    """Check `value` against the annotation `tp` (recursing into dataclasses and lists)."""
    def fail():
        raise ConfigError(f"{source}: {key}: expected {_describe(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg, key, source)
                except ConfigError:
                    pass
        fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return from_dict(tp, value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail()
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail()
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_type, key, source): _convert(v, value_type, f"{key}[{k!r}]", source)
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in a dataclass, not in the YAML


def from_dict(cls, data: dict, prefix: str, source: str):
    """Build dataclass `cls` from `data`; unknown keys and wrong types name the file and key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise ConfigError(f"{source}: {prefix}.{key}: unknown key (expected one of: {', '.join(names)})")
    return cls(**{k: _convert(v, hints[k], f"{prefix}.{k}", source) for k, v in data.items()})


# ---------------------------------------------------------------------------- reading YAML
class _ConfigLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot: `lr: 3e-4` and `5e8` would be strings.
    Configs write them as YAML 1.2 (and Python) read them: numbers."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


# ---------------------------------------------------------------------------- overrides
def apply_override(raw: dict, assignment: str, source: str = "--set") -> None:
    """Apply `section.key.sub=value` to the raw YAML dict; the value is parsed as a YAML scalar."""
    if "=" not in assignment:
        raise ConfigError(f"{source} {assignment!r}: expected section.key=value")
    dotted, text = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"{source} {assignment!r}: expected section.key=value, e.g. train.max_steps=10")
    try:
        value = read_yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} {assignment!r}: the value is not valid YAML ({error})") from None
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source} {assignment!r}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value


# ---------------------------------------------------------------------------- loading
def resolve_model_path(name: str, source: str) -> Path:
    """NAME -> configs/model/NAME.yaml (beside the run config, under cwd, or in the repo)."""
    here = Path(source).parent
    if name.endswith((".yaml", ".yml")) or "/" in name:
        candidates = [Path(name), here / name, REPO_ROOT / name]
    else:
        candidates = [here.parent / "model" / f"{name}.yaml", Path("configs/model") / f"{name}.yaml",
                      REPO_ROOT / "configs" / "model" / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"{source}: model.config: no model config {name!r} "
                      f"(looked for {', '.join(str(c) for c in candidates)})")


def load_model_config(section: ModelSection, source: str):
    """The validated HopeConfig of a run (imports the model package only here)."""
    from hope import HopeConfig, ModelConfigError

    path = resolve_model_path(section.config, source)
    try:
        return HopeConfig.from_yaml(path, **section.overrides)
    except ModelConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override, type-check and validate a run config (the model config included)."""
    source = str(path)
    try:
        raw = read_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections model, data, train, optimizer, deepspeed")
    for assignment in overrides:
        apply_override(raw, assignment)
    sections = ("model", "data", "train", "optimizer", "deepspeed")
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{source}: {key}: unknown section (expected one of: {', '.join(sections)})")
    for key in sections:
        if not isinstance(raw.get(key) or {}, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {raw[key]!r}")
    model_raw = dict(raw.get("model") or {})
    model_name = model_raw.pop("config", "tiny")
    if not isinstance(model_name, str):
        raise ConfigError(f"{source}: model.config: expected a model name or path, got {model_name!r}")
    config = RunConfig(
        model=ModelSection(model_name, model_raw),
        data=from_dict(DataConfig, raw.get("data") or {}, "data", source),
        train=from_dict(TrainConfig, raw.get("train") or {}, "train", source),
        optimizer=from_dict(OptimizerConfig, raw.get("optimizer") or {}, "optimizer", source),
        deepspeed=dict(raw.get("deepspeed") or {}),
        source=source,
    )
    point_at_dataset_directories(config.data, source)
    validate(config)
    model = load_model_config(config.model, source)  # the model package validates its own fields
    if config.data.path == "default" and not config.data.mixture and config.data.vocab_size > model.vocab_size:
        raise ConfigError(f"{source}: data.vocab_size: expected at most the model's vocab_size "
                          f"{model.vocab_size}, got {config.data.vocab_size}")
    # RoPE works at any position, but the exported config's max_position_embeddings is what Hugging
    # Face users (generate, their own length checks) take as the model's context
    if config.data.seq_len > model.max_position_embeddings:
        raise ConfigError(f"{source}: data.seq_len: expected at most the model's max_position_embeddings "
                          f"{model.max_position_embeddings} (raise it with --set "
                          f"model.max_position_embeddings={config.data.seq_len}), got {config.data.seq_len}")
    return config


# ---------------------------------------------------------------------------- dataset locations
def dataset_directory(location: str) -> str:
    """A dataset named by its manifest.json is the directory holding it (the loaders read either;
    the directory is what metrics labels and checkpoints name)."""
    trimmed = location.rstrip("/")
    if trimmed == MANIFEST_NAME or trimmed.endswith("/" + MANIFEST_NAME):
        return trimmed[:-len(MANIFEST_NAME)].rstrip("/") or "."
    return location


def dataset_identity(location: str) -> str:
    """One string per dataset however its location is written: a local path resolved (relative,
    `./`, a trailing `/`, symlinks, file://), a URL with its scheme lower-cased and its path
    normalised (`//`, a trailing `/`). Like the key the loader files a dataset's reads under
    (data_pipeline.loader), which leaves URLs as written."""
    location = dataset_directory(location)
    if "://" not in location:
        return os.path.realpath(location)
    scheme, path = location.split("://", 1)
    if scheme.lower() == "file":
        return os.path.realpath(path)
    return f"{scheme.lower()}://{posixpath.normpath(path) if path else ''}"


def point_at_dataset_directories(data: DataConfig, source: str) -> None:
    """data.path and the mixture's datasets as directories (not manifest.json); a mixture that
    names one dataset twice is refused with both spellings (it would read that dataset twice as
    often as its weight says, and the two entries' reads would be one dataset's in a checkpoint)."""
    if data.path != "default":
        data.path = dataset_directory(data.path)
    seen: dict[str, str] = {}  # identity -> the location as written
    mixture: dict[str, float] = {}
    for location, weight in data.mixture.items():
        identity = dataset_identity(location)
        if identity in seen:
            raise ConfigError(f"{source}: data.mixture: expected each dataset once, got {seen[identity]!r} and "
                              f"{location!r} (both {identity})")
        seen[identity] = location
        mixture[dataset_directory(location)] = weight
    data.mixture = mixture


# ---------------------------------------------------------------------------- validation
def validate(config: RunConfig) -> None:
    source, t, d, ds = config.source, config.train, config.data, config.deepspeed

    def fail(key: str, expected: str, got: Any):
        raise ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")

    for key in ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches", "max_bad_steps"):
        if getattr(t, key) <= 0:
            fail(f"train.{key}", "a positive int", getattr(t, key))
    for key in ("warmup_steps", "eval_every", "seed"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", "an int >= 0", getattr(t, key))
    if t.warmup_steps >= t.max_steps:
        fail("train.warmup_steps", f"fewer than train.max_steps={t.max_steps}", t.warmup_steps)
    if t.schedule not in SCHEDULES:
        fail("train.schedule", f"one of {', '.join(SCHEDULES)}", t.schedule)
    if not 0.0 < t.decay_fraction <= 1.0:
        fail("train.decay_fraction", "a number in (0, 1]", t.decay_fraction)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        fail("train.min_lr_ratio", "a number in [0, 1]", t.min_lr_ratio)
    if t.wandb not in WANDB_MODES:
        fail("train.wandb", f"one of {', '.join(WANDB_MODES)}", t.wandb)
    if not isinstance(t.hf_export_every, int) or t.hf_export_every < 0:
        fail("train.hf_export_every", "an int >= 0", t.hf_export_every)
    if t.hf_export_every % t.checkpoint_every:  # an export converts a checkpoint just saved
        fail("train.hf_export_every", f"0 or a multiple of train.checkpoint_every={t.checkpoint_every}", t.hf_export_every)
    if t.hf_export_dtype not in ("bf16", "fp32"):
        fail("train.hf_export_dtype", "one of bf16, fp32", t.hf_export_dtype)
    if t.hf_export_every and t.keep_checkpoints < 2:
        # a periodic export reads its step's checkpoint in a background process; with one checkpoint
        # kept, the next save deletes it under the export, which then fails silently (docs/EXPORT.md)
        fail("train.keep_checkpoints", f"at least 2 with train.hf_export_every={t.hf_export_every} (an export "
             f"reads its checkpoint while training goes on)", t.keep_checkpoints)
    def missing(path: str) -> bool:  # a local dataset directory that is not there (URLs are checked on open)
        return "://" not in path and not Path(path).is_dir()

    if d.path != "default" and missing(d.path):
        fail("data.path", "'default' or a directory of shards (made by hope-data)", d.path)
    if d.mixture:
        if d.path != "default":
            fail("data.path", "no data.path beside data.mixture (the mixture names every dataset)", d.path)
        for path in d.mixture:
            if missing(path):
                fail("data.mixture", "directories of shards (made by hope-data)", path)
        try:
            slot_counts(list(d.mixture.values()))
        except DataError as error:
            raise ConfigError(f"{source}: data.mixture: {error}") from None
    if d.seq_len <= 0:
        fail("data.seq_len", "a positive int", d.seq_len)
    if d.vocab_size <= 0:
        fail("data.vocab_size", "a positive int", d.vocab_size)
    if d.shuffle_window_shards < 0:
        fail("data.shuffle_window_shards", "an int >= 0 (0: shuffle over the whole dataset)", d.shuffle_window_shards)
    try:
        config.optimizer.validate()
    except OptimizerConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    from .deepspeed_config import validate_deepspeed  # (it imports this module)

    validate_deepspeed(ds, source)
    if t.compile and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        # ZeRO-3's parameter hooks run inside every block: traced, they recompile for each layer
        fail("train.compile", "false under deepspeed.zero_optimization.stage=3 (compile runs with ZeRO 0-2)", t.compile)


def resolve_batch(ds: dict, world_size: int, source: str) -> dict:
    """Fill DeepSpeed's three batch keys consistently for this world size.

    The global batch is what a run is about, so when train_batch_size is given it stays fixed and
    gradient accumulation follows the world size (this is what lets a job resume on fewer ranks).
    """
    ds = dict(ds)
    micro = ds["train_micro_batch_size_per_gpu"]
    if "train_batch_size" in ds:
        total = ds["train_batch_size"]
        if total % (micro * world_size):
            raise ConfigError(f"{source}: deepspeed.train_batch_size: expected a multiple of "
                              f"micro batch {micro} x {world_size} ranks, got {total}")
        accum = total // (micro * world_size)
        if ds.get("gradient_accumulation_steps", accum) != accum:
            raise ConfigError(f"{source}: deepspeed.gradient_accumulation_steps: expected {accum} "
                              f"(train_batch_size {total} / micro batch {micro} / {world_size} ranks) or "
                              f"no value, got {ds['gradient_accumulation_steps']}")
        ds["gradient_accumulation_steps"] = accum
    else:
        ds.setdefault("gradient_accumulation_steps", 1)
        ds["train_batch_size"] = micro * ds["gradient_accumulation_steps"] * world_size
    return ds
