"""The run configuration: one YAML file with sections model, data, train, optimizer, deepspeed.

    model:      {config: NAME_OR_PATH, <any HopeConfig field>: override}
    data:       DataConfig         where the tokens come from (one dataset or a weighted mixture), sequence length
    train:      TrainConfig        steps, schedule, checkpoints, logging
    optimizer:  train.optim.OptimizerConfig (owned by the optimizer code; filled here)
    deepspeed:  DeepSpeed's own config dict, passed through (we check only what we rely on)

Everything is checked before any process group starts. A bad value stops with ONE message that
names the file, the key and what was expected:
    configs/train/x.yaml: train.max_steps: expected a positive int, got 'ten'
`--set section.key=value` overrides any field; values are parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.errors import DataError
from data_pipeline.mixture import slot_counts
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
        value = yaml.safe_load(text) if text.strip() else None
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
        raw = yaml.safe_load(Path(path).read_text())
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
    validate_deepspeed(ds, source)
    if t.compile and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        # ZeRO-3's parameter hooks run inside every block: traced, they recompile for each layer
        fail("train.compile", "false under deepspeed.zero_optimization.stage=3 (compile runs with ZeRO 0-2)", t.compile)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_deepspeed(ds: dict, source: str) -> None:
    """Only what the trainer relies on; DeepSpeed checks the rest when the engine starts."""
    def fail(key: str, expected: str, got: Any):
        raise ConfigError(f"{source}: deepspeed.{key}: expected {expected}, got {got!r}")

    micro = ds.get("train_micro_batch_size_per_gpu")
    if not _positive_int(micro):
        fail("train_micro_batch_size_per_gpu", "a positive int", micro)
    if "gradient_accumulation_steps" in ds and not _positive_int(ds["gradient_accumulation_steps"]):
        fail("gradient_accumulation_steps", "a positive int", ds["gradient_accumulation_steps"])
    if "train_batch_size" in ds and not _positive_int(ds["train_batch_size"]):
        fail("train_batch_size", "a positive int", ds["train_batch_size"])
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        fail("zero_optimization", "a mapping", zero)
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        fail("zero_optimization.stage", "0, 1, 2 or 3", zero.get("stage"))
    for key in ("fp16", "bf16"):
        if key in ds and not (isinstance(ds[key], dict) and isinstance(ds[key].get("enabled", False), bool)):
            fail(f"{key}", "a mapping like {enabled: true}", ds[key])
    if ds.get("fp16", {}).get("enabled"):
        fail("fp16.enabled", "false (this trainer runs fp32 or bf16)", True)
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        fail("gradient_clipping", "a number >= 0", clip)


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
