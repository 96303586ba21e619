"""The `deepspeed:` section of a run config, checked before any process group starts.

The section goes to deepspeed.initialize as written (its batch keys resolved by
train.config.resolve_batch). DeepSpeed would check it only there, after the process group started,
as a traceback on every rank, and it ignores keys it does not know. So it is checked here, in this
order:
  1. keys the trainer sets itself, or that would silently fight what it does: refused, with why;
  2. what the trainer relies on (batch keys, ZeRO stage, precision, clipping), in our words;
  3. every key through DeepSpeed's own parser (deepspeed.runtime.config.DeepSpeedConfig and the
     pydantic models it builds, e.g. DeepSpeedZeroConfig, which refuse unknown nested keys), one
     key at a time so that what it refuses is named by its path; then the keys it did not read
     (DeepSpeed ignores them) refused as unknown;
  4. what DeepSpeed made of it that the trainer cannot run (optimizer offload).
"""
from __future__ import annotations

import difflib
import functools
import logging
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, _convert

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")

TRAINER_OWNED_KEYS = {
    "optimizer": "the optimizer is the run config's optimizer: section (train.optim); DeepSpeed would ignore this one",
    "scheduler": "the learning-rate schedule is train.schedule (the trainer sets the lr of every step)",
    "zero_allow_untested_optimizer": "the trainer sets it (train.optim is tested under ZeRO 0-3)",
    "wandb": "Weights & Biases logging is train.wandb (this would start a second W&B run)",
    "activation_checkpointing": "activation checkpointing of whole blocks is model.gradient_checkpointing_layers "
                                "(DeepSpeed's applies only to models that call deepspeed.checkpointing)",
    "bfloat16": "write it as deepspeed.bf16 (DeepSpeed's older name, which the trainer does not read)",
}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_deepspeed(ds: dict, source: str) -> None:
    """The deepspeed: section, in the four steps above; one ConfigError naming the key path."""
    for key, why in TRAINER_OWNED_KEYS.items():
        if key in ds:
            raise ConfigError(f"{source}: deepspeed.{key}: leave it out: {why}")
    check_what_the_trainer_relies_on(ds, source)
    parsed = check_with_deepspeed(ds, source)
    offload = parsed.zero_config.offload_optimizer  # also set by the deprecated spelling cpu_offload: true
    if offload is not None and offload.device != "none":
        raise ConfigError(f"{source}: deepspeed.zero_optimization.offload_optimizer: expected no optimizer offload "
                          f"(train.optim steps whole matrices, not offloaded fragments), got device {offload.device!r}")


def check_what_the_trainer_relies_on(ds: dict, source: str) -> None:
    """Batch keys, ZeRO stage, precision and clipping: the values the trainer reads itself."""
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
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:  # 2.0 and true are not stages
        fail("zero_optimization.stage", "0, 1, 2 or 3", stage)
    for key in ("fp16", "bf16"):
        if key in ds and not (isinstance(ds[key], dict) and isinstance(ds[key].get("enabled", False), bool)):
            fail(f"{key}", "a mapping like {enabled: true}", ds[key])
    if ds.get("fp16", {}).get("enabled"):
        fail("fp16.enabled", "false (this trainer runs fp32 or bf16)", True)
    if ds.get("bf16", {}).get("enabled") and stage == 0:
        # DeepSpeed then wraps the optimizer in FP16_UnfusedOptimizer, which steps it once with zero
        # gradients at start-up (train/optim/build.py)
        fail("bf16.enabled", "false with deepspeed.zero_optimization.stage=0 (bf16 needs ZeRO stage 1, 2 or 3; "
             "stage 1 costs nothing on one GPU)", True)
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        fail("gradient_clipping", "a number >= 0", clip)


class _KeyRecorder(dict):
    """A dict that notes the keys DeepSpeed looks up in it and the defaults it offers for them: what
    DeepSpeed reads is what it knows (it ignores any other key), and the type of the default it
    offers is the type it expects. DeepSpeedConfig copies the dict with copy.copy, which shares
    these two attributes with the copy."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set[str] = set()
        self.defaults: dict[str, list] = {}

    def get(self, key, *default):
        self.read.add(key)
        if default:
            self.defaults.setdefault(key, []).append(default[0])
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


@dataclass
class DeepSpeedParse:
    config: Any  # deepspeed.runtime.config.DeepSpeedConfig
    read: set[str]  # the top-level keys it looked up
    defaults: dict[str, list]  # the defaults it offered for them


class _OneRank:
    """The `mpu` argument of DeepSpeedConfig: a data-parallel world of one rank, whether or not a
    process group exists (the parse below needs none)."""

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return 1


def parse_with_deepspeed(section: dict) -> DeepSpeedParse:
    """Parse `section` with DeepSpeed's own config class, as deepspeed.initialize will; raises what
    DeepSpeed raises. It is parsed for one rank with the batch keys replaced by a one-sequence
    batch: ours are resolved for the real world size by resolve_batch."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    recorder = _KeyRecorder({**section, **{key: 1 for key in BATCH_KEYS}})
    level = logger.level
    logger.setLevel(logging.ERROR)  # its notes on deprecated keys: the engine repeats them when it starts
    try:
        config = DeepSpeedConfig(recorder, mpu=_OneRank())
    finally:
        logger.setLevel(level)
    return DeepSpeedParse(config, recorder.read, recorder.defaults)


@functools.cache
def deepspeed_baseline() -> DeepSpeedParse:
    """DeepSpeed's parse of an empty section: the keys it always reads and their defaults."""
    return parse_with_deepspeed({})


_PLAIN_TYPES = {bool: bool, int: int, float: float, str: str, dict: dict[str, Any], list: list[Any]}


# Keys whose DeepSpeed default is None (so it offers no type to check against) and what they take.
TYPES_OF_KEYS_WITHOUT_DEFAULT = {"steps_per_print": int, "log_level": str, "vocabulary_size": int}


def check_type_deepspeed_expects(key: str, value: Any, source: str) -> None:
    """A key whose defaults in DeepSpeed are all of one plain type takes that type: DeepSpeed's
    parser would let `wall_clock_breakdown: maybe` through, to fail in the middle of training."""
    if key in TYPES_OF_KEYS_WITHOUT_DEFAULT:
        if value is not None:
            _convert(value, TYPES_OF_KEYS_WITHOUT_DEFAULT[key], f"deepspeed.{key}", source)
        if key == "steps_per_print" and value is not None and value < 1:  # the engine takes step % it
            raise ConfigError(f"{source}: deepspeed.steps_per_print: expected a positive int, got {value!r}")
        return
    offered = {type(default) for default in deepspeed_baseline().defaults.get(key, [])}
    if len(offered) == 1:
        (kind,) = offered
        if kind in _PLAIN_TYPES:
            _convert(value, _PLAIN_TYPES[kind], f"deepspeed.{key}", source)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _has(node: Any, loc: list[str]) -> bool:
    """Whether the nested mappings of `node` hold the key path `loc`."""
    for name in loc:
        if not isinstance(node, dict) or name not in node:
            return False
        node = node[name]
    return True


def _full_path(value: Any, loc: list[str]) -> list[str]:
    """`loc` inside `value`: DeepSpeed builds some models from a subsection (timers.throughput), so
    the path it reports can lack the keys above it; the one path in `value` that ends with `loc`."""
    def paths(node: Any, above: list[str]):
        if isinstance(node, dict):
            if _has(node, loc):
                yield above + loc
            for name, child in node.items():
                yield from paths(child, above + [str(name)])

    found = list(paths(value, []))
    return found[0] if len(found) == 1 else loc


def deepspeed_complaint(error: Exception, key: str | None, value: Any = None) -> str:
    """What DeepSpeed refused, as `deepspeed.PATH: ...` on one line (key None: the whole section)."""
    from pydantic import ValidationError

    path = f"deepspeed.{key}" if key else "deepspeed"
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        loc = [str(part) for part in first["loc"]]
        if key and loc[:1] == [key]:  # the monitors' model names each section itself
            loc = loc[1:]
        if key:  # (of the whole section, the path inside a model would not say which section)
            path = ".".join([path, *_full_path(value, loc)])
        if first["type"] == "extra_forbidden":
            return f"{path}: unknown key (DeepSpeed has no such setting)"
        message = first["msg"]
        if first["type"] == "value_error":  # a DeepSpeed validator's own sentence
            return f"{path}: {message.removeprefix('Value error, ')}"
        if message.startswith("Input should be "):
            return f"{path}: expected {message.removeprefix('Input should be ')}, got {first['input']!r}"
        return f"{path}: {message} (got {first['input']!r})"
    from deepspeed.runtime.config import DeepSpeedConfigError

    if isinstance(error, DeepSpeedConfigError) or key is None:  # DeepSpeed's own message
        return f"{path}: {_one_line(error)}"
    return f"{path}: DeepSpeed cannot read {value!r} ({type(error).__name__}: {_one_line(error)})"


def check_with_deepspeed(ds: dict, source: str):
    """Step 3: every key as DeepSpeed parses it, then the keys it does not read refused as unknown.
    Returns DeepSpeed's parsed config (a DeepSpeedConfig)."""
    for key, value in ds.items():
        if key in BATCH_KEYS:  # checked by check_what_the_trainer_relies_on and resolve_batch
            continue
        check_type_deepspeed_expects(key, value, source)
        try:
            parse_with_deepspeed({key: value})  # alone: what DeepSpeed refuses is this key's fault
        except Exception as error:  # noqa: BLE001 - any refusal by DeepSpeed's parser becomes one line
            raise ConfigError(f"{source}: {deepspeed_complaint(error, key, value)}") from None
    try:
        parsed = parse_with_deepspeed(ds)  # together: what spans keys (e.g. a deprecated key and its new name)
    except Exception as error:  # noqa: BLE001
        raise ConfigError(f"{source}: {deepspeed_complaint(error, None)}") from None
    for key in ds:
        if key not in parsed.read:
            known = sorted(deepspeed_baseline().read | parsed.read | set(TRAINER_OWNED_KEYS))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{source}: deepspeed.{key}: unknown key (DeepSpeed does not read it{hint})")
    return parsed.config
