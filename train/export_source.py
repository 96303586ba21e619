"""What hope-export reads: a trainer checkpoint's metadata and its weights, checked as they are read.

Weights come from the DeepSpeed checkpoint of any ZeRO stage and world size through
deepspeed.utils.zero_to_fp32 (stage 0 checkpoints hold the whole module in one file). A damaged
file is an ExportError naming it, on one line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hope import HopeConfig, HopeForCausalLM

from .checkpoint import LATEST, torch_file_damage


class ExportError(ValueError):
    """A checkpoint or an export option is unusable; the message names the file or value."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (YAML, torch and pydantic-style errors span several)."""
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class CheckpointInfo:
    path: Path  # RUN_DIR/checkpoints/step-XXXXXXXX
    run_dir: Path | None
    step: int
    tokens_seen: int
    world_size: int
    run_config: dict
    model_config: HopeConfig
    data_state: dict = field(default_factory=dict)  # the loader's state: it records each dataset's absolute path


# ---------------------------------------------------------------------- reading a checkpoint
def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its `latest` checkpoint) or one checkpoint directory."""
    path = Path(path)
    if (path / "model_config.json").is_file():
        return path
    latest = path / "checkpoints" / LATEST
    if latest.is_file():
        try:
            checkpoint = path / "checkpoints" / latest.read_text().strip()
        except (OSError, ValueError) as error:  # ValueError: not UTF-8
            raise ExportError(f"{latest}: not readable ({one_line(error)})") from None
        if not (checkpoint / "model_config.json").is_file():
            raise ExportError(f"{latest} names {checkpoint.name!r}, which holds no model_config.json")
        return checkpoint
    raise ExportError(f"{path}: expected a run directory (with checkpoints/latest) or a checkpoint "
                      "directory (with model_config.json)")


def read_json_object(path: Path) -> dict:
    """One of a checkpoint's JSON metadata files, which must hold an object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise ExportError(f"{path}: not readable JSON ({one_line(error)})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_run_config(path: Path) -> dict:
    """config.yaml, the run's resolved config ({} when the checkpoint has none)."""
    if not path.is_file():
        return {}
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ExportError(f"{path}: not readable YAML ({one_line(error)})") from None
    if not isinstance(value, (dict, type(None))):
        raise ExportError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value or {}


def read_count(state: dict, key: str, path: Path, default: int, least: int) -> int:
    """An integer field of trainer_state.json."""
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ExportError(f"{path}: {key} is {value!r}, expected an integer >= {least}")
    return value


def read_model_config(path: Path) -> HopeConfig:
    fields = read_json_object(path)
    try:
        return HopeConfig(**fields).validate()
    except Exception as error:  # TypeError, ModelConfigError, or huggingface_hub's StrictDataclassError
        raise ExportError(f"{path}: not a valid model configuration: {one_line(error)}") from None


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    checkpoint = resolve_checkpoint(path)
    state_path = checkpoint / "trainer_state.json"
    state = read_json_object(state_path)
    data_state = state.get("data_state")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    return CheckpointInfo(checkpoint, run_dir,
                          read_count(state, "step", state_path, 0, 0),
                          read_count(state, "tokens_seen", state_path, 0, 0),
                          read_count(state, "world_size", state_path, 1, 1),
                          read_run_config(checkpoint / "config.yaml"),
                          read_model_config(checkpoint / "model_config.json"),
                          data_state if isinstance(data_state, dict) else {})


def check_weight_files(checkpoint: Path, world_size: int) -> None:
    """Name a missing, empty, truncated or altered weights file before DeepSpeed or torch.load fails
    on it with a traceback that does not say which file, or loads it silently with wrong values.
    Reads each file once (its checksums), as the export does anyway."""
    files = sorted(checkpoint.glob("*_model_states.pt")) + sorted(checkpoint.glob("*_optim_states.pt"))
    # ZeRO's files: [bf16_]zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt, one of each kind per rank
    ranked = [re.fullmatch(r"((?:bf16_)?zero_pp_rank_)(\d+)(_mp_rank_\d+_(?:model|optim)_states\.pt)", f.name)
              for f in files]
    for kind in {(m.group(1), m.group(3)) for m in ranked if m}:
        ranks = {int(m.group(2)) for m in ranked if m and (m.group(1), m.group(3)) == kind}
        count = max(world_size, max(ranks) + 1)
        for rank in range(count):
            if rank not in ranks:
                raise ExportError(f"{checkpoint / f'{kind[0]}{rank}{kind[1]}'}: missing (expected one such file "
                                  f"for each of ranks 0-{count - 1})")
    for file in files:
        if file.stat().st_size == 0:
            raise ExportError(f"{file}: empty file (the save did not complete)")
        with open(file, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format; older pickles are left to torch.load
        damage = torch_file_damage(file) if is_zip else None
        if damage is not None:
            raise ExportError(f"{file}: {damage}")


def consolidated_state_dict(checkpoint: Path, world_size: int = 1) -> dict[str, torch.Tensor]:
    """fp32 weights by name, from a DeepSpeed checkpoint of any ZeRO stage saved on any world size."""
    check_weight_files(checkpoint, world_size)
    if any(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        except MemoryError:
            raise  # not a bad file: too little host memory
        except Exception as error:  # zero_to_fp32 and torch.load raise many kinds; one line is what we can say
            raise ExportError(f"{checkpoint}: cannot consolidate the ZeRO checkpoint "
                              f"({type(error).__name__}: {one_line(error)})") from None
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ExportError(f"{checkpoint}: no DeepSpeed model states (expected mp_rank_00_model_states.pt)")
    try:
        module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
        return {name: tensor.float() for name, tensor in module.items()}
    except MemoryError:
        raise
    except Exception as error:  # a corrupt file: RuntimeError, EOFError, UnpicklingError, KeyError ...
        raise ExportError(f"{model_file}: not a readable DeepSpeed model states file "
                          f"({type(error).__name__}: {one_line(error)})") from None


def check_weights_fit(model: HopeForCausalLM, weights: dict[str, torch.Tensor], config_path: Path) -> None:
    """One line naming the tensors that differ, instead of load_state_dict's many-line error."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(weights) - tied)
    unexpected = sorted(set(weights) - set(expected))
    reshaped = [f"{name} is {list(weights[name].shape)} in the checkpoint, {list(expected[name].shape)} by the config"
                for name in expected if name in weights and weights[name].shape != expected[name].shape]
    problems = [f"missing {missing[:3]}"] if missing else []
    problems += [f"unexpected {unexpected[:3]}"] if unexpected else []
    problems += reshaped[:2]
    if problems:
        raise ExportError(f"{config_path} does not fit the checkpoint's weights: {'; '.join(problems)}")


def load_model(info: CheckpointInfo) -> HopeForCausalLM:
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: leave the caller's RNG alone
        model = HopeForCausalLM(info.model_config).float().eval()
    weights = consolidated_state_dict(info.path, info.world_size)
    check_weights_fit(model, weights, info.path / "model_config.json")
    model.load_state_dict(weights, strict=False)  # strict=False: a tied lm_head is not saved
    model.tie_weights()
    return model
