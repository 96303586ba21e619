"""The typed run config: loading, --set overrides, and one clear message per mistake."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, apply_override, load_config, resolve_batch

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


def write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {
    "model": {"config": "tiny", "hidden_size": 64, "num_layers": 2},
    "data": {"path": "default", "seq_len": 32},
    "train": {"max_steps": 10, "checkpoint_every": 5, "log_every": 1, "seed": 3},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "deepspeed": {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}},
}


def refused(tmp_path: Path, data: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), list(overrides))
    return str(info.value)


def test_loads_typed_sections(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.train.max_steps == 10 and config.train.seed == 3
    assert config.optimizer.name == "adamw" and config.optimizer.lr == pytest.approx(1e-3)
    assert config.data.seq_len == 32
    assert config.model.overrides == {"hidden_size": 64, "num_layers": 2}
    assert config.deepspeed["zero_optimization"]["stage"] == 1
    # the resolved config round-trips through YAML (it is written beside every checkpoint)
    again = write(tmp_path, config.to_dict(), "again.yaml")
    assert load_config(again).to_dict() == config.to_dict()


def test_set_overrides_any_field_and_nested_deepspeed_keys(tmp_path):
    config = load_config(write(tmp_path, BASE), [
        "train.max_steps=20", "deepspeed.zero_optimization.stage=3", "optimizer.betas=[0.8, 0.9]",
        "model.num_layers=1", "deepspeed.bf16.enabled=true", "train.wandb_name=abc"])
    assert config.train.max_steps == 20
    assert config.deepspeed["zero_optimization"]["stage"] == 3
    assert config.deepspeed["bf16"] == {"enabled": True}
    assert config.optimizer.betas == [0.8, 0.9]
    assert config.model.overrides["num_layers"] == 1
    assert config.train.wandb_name == "abc"


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=ten", "train.max_steps: expected an int, got 'ten'"),
    ("train.max_steps=0", "train.max_steps: expected a positive int, got 0"),
    ("train.log_every=1.5", "train.log_every: expected an int, got 1.5"),
    ("train.progress_bar=maybe", "train.progress_bar: expected true or false, got 'maybe'"),
    ("train.schedule=linear", "train.schedule: expected one of cosine, wsd, constant, got 'linear'"),
    ("train.warmup_steps=10", "train.warmup_steps: expected fewer than train.max_steps=10, got 10"),
    ("train.no_such_key=1", "train.no_such_key: unknown key"),
    ("data.seq_len=-4", "data.seq_len: expected a positive int, got -4"),
    ("data.shuffle_window_shards=-2", "data.shuffle_window_shards: expected an int >= 0 (0: shuffle over the whole dataset), got -2"),
    ("data.shuffle_window_shards=4.5", "data.shuffle_window_shards: expected an int, got 4.5"),
    ("data.seq_len=2048", ("data.seq_len: expected at most the model's max_position_embeddings 1024 "
                           "(raise it with --set model.max_position_embeddings=2048), got 2048")),
    ("data.path=/no/such/shards", "data.path: expected 'default' or a directory of shards (made by hope-data), got '/no/such/shards'"),
    ("optimizer.name=sgd", "optimizer.name = 'sgd': expected one of adamw, muon, m3"),
    ("optimizer.matrix.ns_steps=x", "optimizer.matrix.ns_steps: expected an int, got 'x'"),
    ("deepspeed.zero_optimization.stage=4", "deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got 4"),
    ("deepspeed.train_micro_batch_size_per_gpu=0", "deepspeed.train_micro_batch_size_per_gpu: expected a positive int"),
    ("deepspeed.fp16.enabled=true", "deepspeed.fp16.enabled: expected false"),
    # the deepspeed section through DeepSpeed's own parser: unknown keys, wrong types, by their path
    ("deepspeed.zero_optimization.stage=two", "deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got 'two'"),
    ("deepspeed.zero_optimization.stage=2.0", "deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got 2.0"),
    ("deepspeed.zero_optimisation={stage: 2}", ("deepspeed.zero_optimisation: unknown key (DeepSpeed does not read it; "
                                                "did you mean zero_optimization?)")),
    ("deepspeed.zero_optimization.overlapcomm=true", "deepspeed.zero_optimization.overlapcomm: unknown key"),
    ("deepspeed.bf16.enabld=true", "deepspeed.bf16.enabld: unknown key"),
    ("deepspeed.zero_optimization.offload_param={device: gpu}",
     "deepspeed.zero_optimization.offload_param.device: expected 'none', 'cpu' or 'nvme', got 'gpu'"),
    ("deepspeed.tensorboard={enabled: maybe}", "deepspeed.tensorboard.enabled: expected a valid boolean"),
    ("deepspeed.wall_clock_breakdown=maybe", "deepspeed.wall_clock_breakdown: expected true or false, got 'maybe'"),
    # keys the trainer sets itself, or that DeepSpeed would take in a way the trainer cannot run
    ("deepspeed.optimizer={type: Adam}", "deepspeed.optimizer: leave it out: the optimizer is the run config's optimizer: section"),
    ("deepspeed.scheduler={type: WarmupLR}", "deepspeed.scheduler: leave it out: the learning-rate schedule is train.schedule"),
    ("deepspeed.zero_optimization.cpu_offload=true",  # DeepSpeed's old spelling of offload_optimizer: {device: cpu}
     "deepspeed.zero_optimization.offload_optimizer: expected no optimizer offload"),
    ("model.hidden_size=-1", "model.hidden_size"),
    # sizes are named before transformers' own checks divide by them
    ("deepspeed.timers={throughput: {enabled: x}}", "deepspeed.timers.throughput.enabled: expected a valid boolean"),
    ("deepspeed.steps_per_print=abc", "deepspeed.steps_per_print: expected an int, got 'abc'"),
    ("deepspeed.steps_per_print=0", "deepspeed.steps_per_print: expected a positive int, got 0"),
    ("model.hidden_size=abc", "model.hidden_size: expected a positive integer, got 'abc'"),
    ("model.num_heads=abc", "model.num_heads: expected a positive integer, got 'abc'"),
    ("model.num_heads=0", "model.num_heads: expected a positive integer, got 0"),
    ("model.no_such_field=1", "model.no_such_field: unknown key"),
    ("model.config=nonexistent-model", "model.config: no model config 'nonexistent-model'"),
])
def test_bad_values_name_file_key_and_expectation(tmp_path, override, expected):
    message = refused(tmp_path, BASE, override)
    assert message.startswith(str(tmp_path / "run.yaml") + ": "), message
    assert expected in message, message
    assert "\n" not in message


def test_check_plans_a_run_for_any_world_size_without_starting_it(tmp_path, capsys):
    from test_data_loader import write_dataset

    from data_pipeline import TokenLoader
    from hope import HopeForCausalLM
    from train.cli import main
    from train.config import load_model_config

    web, code = (str(write_dataset(tmp_path / name, vocab=4096)) for name in ("web", "code"))
    with TokenLoader(web, 32, 8, 0, 1, seed=0) as loader:
        samples = loader.num_samples
    path = write(tmp_path, {**BASE, "data": {"path": web, "seq_len": 32}})
    model = HopeForCausalLM(load_model_config(load_config(path).model, str(path)))  # counted for real here
    assert main([str(path), "--check", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in model.parameters())
    assert out == (f"hope-train: {path}: valid\nmodel tiny: {params:,} parameters | 4 ranks x micro-batch 2 x accumulation "
                   f"1 = 8 sequences of 32 = 256 tokens/step | 10 steps = 2,560 tokens, {80 / samples:.3g} epochs of the data\n")
    mixture = f"data.mixture={{{web}: 3, {code}: 1}}"
    assert main([str(path), "--check", "--world-size", "2", "--set", "data.path=default", "--set", mixture]) == 0
    assert f"epochs of each dataset: web {30 / samples:.3g}, code {10 / samples:.3g}\n" in capsys.readouterr().out
    # what the trainer's loaders would refuse at their start, --check refuses too
    other = str(write_dataset(tmp_path / "other", vocab=4096, tokenizer_sha="e" * 16))
    no_validation = str(write_dataset(tmp_path / "no-validation", vocab=4096, valid_sizes=()))
    large = str(write_dataset(tmp_path / "large-vocabulary", vocab=50000))
    for data, message in ((f"data.mixture={{{web}: 1, {other}: 1}}", "a mixture's datasets need one tokenizer"),
                          (f"data.path={large}", "tokenizer vocabulary is 50000 (synthetic), larger than the model's"),
                          (f"data.mixture={{{web}: 1, {no_validation}: 1}}", "split 'validation' has 0 tokens"),
                          ("data.seq_len=100000", "split 'train' has")):
        assert main([str(path), "--check", "--set", "data.path=default" if "mixture" in data else "data.seq_len=32",
                     "--set", data, "--set", "model.max_position_embeddings=100000"]) == 2, data
        assert message in capsys.readouterr().err, data
    truncated = write_dataset(tmp_path / "truncated", vocab=4096)  # a shard cut short: the loaders refuse it
    shard = sorted(truncated.glob("train-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main([str(path), "--check", "--set", f"data.path={truncated}"]) == 2
    assert f"{shard}: truncated shard" in capsys.readouterr().err
    fixed = write(tmp_path, {**BASE, "deepspeed": {**BASE["deepspeed"], "train_batch_size": 8}}, "fixed.yaml")
    assert main([str(fixed), "--check", "--world-size", "3"]) == 2
    assert "deepspeed.train_batch_size: expected a multiple of micro batch 2 x 3 ranks, got 8" in capsys.readouterr().err
    assert main([str(path)]) == 2 and "--run-dir is required to train" in capsys.readouterr().err


def test_bf16_needs_zero_stage_1_or_more(tmp_path):
    message = refused(tmp_path, BASE, "deepspeed.zero_optimization.stage=0", "deepspeed.bf16.enabled=true")
    assert "deepspeed.bf16.enabled: expected false with deepspeed.zero_optimization.stage=0" in message, message
    load_config(write(tmp_path, BASE), ["deepspeed.bf16.enabled=true"])  # stage 1


def test_check_refuses_a_deepspeed_typo_in_one_line(tmp_path, capsys):
    from train.cli import main

    path = write(tmp_path, BASE)
    assert main([str(path), "--check", "--set", "deepspeed.zero_optimisation={stage: 2}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"hope-train: error: {path}: deepspeed.zero_optimisation: unknown key (DeepSpeed does not read it; "
                   f"did you mean zero_optimization?)\n"), err


def test_periodic_exports_keep_two_checkpoints(tmp_path):
    """An export reads its step's checkpoint in the background; with one kept, the next save deletes it."""
    message = refused(tmp_path, BASE, "train.hf_export_every=5", "train.keep_checkpoints=1")
    assert "train.keep_checkpoints: expected at least 2 with train.hf_export_every=5" in message, message
    load_config(write(tmp_path, BASE), ["train.keep_checkpoints=1"])  # no exports: one checkpoint is enough
    load_config(write(tmp_path, BASE), ["train.hf_export_every=5", "train.keep_checkpoints=2"])


def test_compile_is_refused_under_zero3(tmp_path):
    message = refused(tmp_path, BASE, "train.compile=true", "deepspeed.zero_optimization.stage=3")
    assert "train.compile: expected false under deepspeed.zero_optimization.stage=3" in message, message


def test_compile_blocks_needs_a_model_that_names_its_blocks():
    import torch

    from train.compile import compile_blocks

    with pytest.raises(ValueError, match="Linear names no blocks to compile"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_unknown_section_and_bad_yaml(tmp_path):
    assert "optimiser: unknown section" in refused(tmp_path, {**BASE, "optimiser": {}})
    path = tmp_path / "broken.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_override({}, "max_steps=3")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_override({}, "train.max_steps")
    with pytest.raises(ConfigError, match="train.max_steps is not a section"):
        apply_override({"train": {"max_steps": 3}}, "train.max_steps.x=1")


def test_batch_keys_follow_the_world_size(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 8}
    assert resolve_batch(ds, 2, "x.yaml")["gradient_accumulation_steps"] == 2
    assert resolve_batch(ds, 1, "x.yaml")["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match="train_batch_size: expected a multiple of micro batch 2 x 3 ranks"):
        resolve_batch(ds, 3, "x.yaml")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: expected 2"):
        resolve_batch({**ds, "gradient_accumulation_steps": 3}, 2, "x.yaml")
    fixed = resolve_batch({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2, "x.yaml")
    assert fixed["train_batch_size"] == 12


def test_scripts_keys_exist_in_every_shipped_train_config():
    assert TRAIN_CONFIGS, "configs/train/ has no configs"
    for path in TRAIN_CONFIGS:
        config = load_config(path, ["data.path=default"])  # shipped pretraining paths exist on clusters only
        for key in ("max_steps", "checkpoint_every", "log_every", "seed"):
            assert getattr(config.train, key) is not None
        assert config.optimizer.name


@pytest.mark.parametrize("name", ["340M", "760M", "1.3B"])
def test_pretraining_recipes_fit_any_cluster_and_say_their_token_budget(name):
    """The shipped pretraining recipes keep their global batch on 1 to 16 nodes of 8 GPUs (so a run
    resumes on another number of nodes), their model is the size they are named for, they export
    to Hugging Face periodically, and the token budget in their comment is the one they run."""
    import re

    from train.config import load_model_config

    path = REPO / "configs" / "train" / f"{name}.yaml"
    config = load_config(path, ["data.path=default"])
    assert load_model_config(config.model, str(path)).hidden_size == yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())["hidden_size"]
    for ranks in (8, 16, 32, 64, 128):
        if ranks * config.deepspeed["train_micro_batch_size_per_gpu"] <= config.deepspeed["train_batch_size"]:
            resolve_batch(config.deepspeed, ranks, str(path))
    assert config.train.hf_export_every > 0 and config.train.keep_checkpoints >= 2  # docs/EXPORT.md
    tokens = config.train.max_steps * config.deepspeed["train_batch_size"] * config.data.seq_len
    stated = re.search(r"max_steps: \d+ +# ([\d.]+)B tokens", path.read_text())
    assert stated and float(stated.group(1)) == round(tokens / 1e9, 1)


def test_cli_refuses_bad_config_with_one_line_and_status_2(tmp_path):
    path = write(tmp_path, BASE)
    result = subprocess.run([sys.executable, "-m", "train.cli", str(path), "--run-dir", str(tmp_path / "run"),
                             "--set", "train.max_steps=ten"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"hope-train: error: {path}: train.max_steps: expected an int, got 'ten'"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_cli_exit_keeps_the_status_the_output_and_the_exit_handlers():
    """The trainer's ranks exit without the interpreter's teardown (train.cli.exit_without_teardown):
    the status, unflushed output and the exit handlers (logging, child processes) are kept."""
    script = ("import atexit, sys; from train.cli import exit_without_teardown; "
              "atexit.register(lambda: print('handler ran', file=sys.stderr)); "
              "print('unflushed', end=''); exit_without_teardown(3)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "unflushed", "handler ran\n")


def test_a_mixture_names_its_directories_and_positive_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    config = load_config(write(tmp_path, BASE), [f"data.mixture={{{a}: 0.9, {b}: 0.1}}"])
    assert config.data.mixture == {str(a): 0.9, str(b): 0.1}
    for mixture, path, expected in [
        ({str(a): 1, str(b): 1}, str(a), "data.path: expected no data.path beside data.mixture"),
        ({str(a): 1, str(tmp_path / "c"): 1}, "default", f"data.mixture: expected directories of shards (made by "
                                                           f"hope-data), got '{tmp_path / 'c'}'"),
        ({str(a): 1, str(b): "lots"}, "default", f"data.mixture['{b}']: expected a number, got 'lots'"),
        ({str(a): 1, str(b): 1e-6}, "default", "data.mixture: mixture weight 1e-06 (dataset 1) is below 1/10000"),
        ({str(a): 1, str(b): -1}, "default", "data.mixture: mixture weight -1.0: expected a positive number"),
    ]:
        data = {**BASE, "data": {"path": path, "mixture": mixture, "seq_len": 32}}
        assert expected in refused(tmp_path, data)


def test_a_mixture_names_each_dataset_once_however_spelled(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "manifest.json").write_text("{}")
    (tmp_path / "link").symlink_to(a)
    for other in (f"{a}/", os.path.relpath(a), f"{tmp_path}/./a", f"{a}/manifest.json", str(tmp_path / "link")):
        data = {**BASE, "data": {"mixture": {str(a): 1, other: 1}, "seq_len": 32}}
        message = refused(tmp_path, data)  # both spellings named (in the YAML's order: write() sorts keys)
        assert "data.mixture: expected each dataset once, got '" in message, message
        assert f"'{a}'" in message and f"'{other}'" in message and f"(both {a.resolve()})" in message, message
    # remote: compared as normalised strings (an override keeps the order as written)
    message = refused(tmp_path, BASE, "data.mixture={memory://bucket/web: 1, memory://bucket//web/: 1}")
    assert ("data.mixture: expected each dataset once, got 'memory://bucket/web' and 'memory://bucket//web/' "
            "(both memory://bucket/web)") in message, message


def test_a_dataset_named_by_its_manifest_is_its_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for directory in (a, b):
        directory.mkdir()
        (directory / "manifest.json").write_text("{}")
    config = load_config(write(tmp_path, BASE), [f"data.path={a}/manifest.json"])
    assert config.data.path == str(a)
    config = load_config(write(tmp_path, BASE), [f"data.mixture={{{a}/manifest.json: 1, {b}: 1}}"])
    assert config.data.mixture == {str(a): 1.0, str(b): 1.0}


def test_exponents_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads `3e-4` as a string; configs read it as YAML 1.2 and Python do
    text = yaml.safe_dump(BASE)
    assert "lr: 0.001" in text
    (tmp_path / "run.yaml").write_text(text.replace("lr: 0.001", "lr: 3e-4"))
    config = load_config(tmp_path / "run.yaml", ["deepspeed.zero_optimization.reduce_bucket_size=5e8"])
    assert config.optimizer.lr == 3e-4
    assert config.deepspeed["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert load_config(tmp_path / "run.yaml", ["optimizer.lr=2E-3"]).optimizer.lr == 2e-3


def test_check_prints_only_its_two_lines_on_stdout():
    """Without DS_ACCELERATOR on a machine without a GPU, importing DeepSpeed printed its notice
    "Setting accelerator to CPU" on stdout, before the check's own lines."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-m", "train.cli", "configs/train/tiny-cpu.yaml", "--check"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == "hope-train: configs/train/tiny-cpu.yaml: valid", done.stdout
