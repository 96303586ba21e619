"""Checkpoint bookkeeping (atomic save, `latest`, keep-K, failures) and the LR schedules, in-process;
resuming from damaged checkpoints, on changed configs and into bad run directories, in-process and
with real ranks (1 or 2 gloo processes, the way tests/test_train_launch.py starts them)."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_export import alter_a_byte
from train.checkpoint import (Checkpoint, CheckpointError, CheckpointManager, ResumeError, TrainerState,
                              config_changes, write_atomic)
from train.cli import check_run_dir
from train.config import load_config, load_model_config
from train.distributed import World
from train.metrics import amount, duration, format_line
from train.plan import plan_line
from train.schedule import apply_lr, lr_at

ONE = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
REPO = Path(__file__).resolve().parents[1]


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one shard file per save, can fail like a full disk."""

    def __init__(self, fail_with: OSError | None = None):
        self.fail_with = fail_with

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = True):
        assert not save_latest  # `latest` is ours, written only after every rank finished
        path = Path(root) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": torch.ones(64)}, path / "mp_rank_00_model_states.pt")
        if self.fail_with is not None:
            raise self.fail_with


def save(manager: CheckpointManager, step: int, engine=None) -> Path:
    state = TrainerState(step=step, tokens_seen=step * 10, data_state={"samples_consumed": step})
    return manager.save(engine or FakeEngine(), state, {"rng": 1}, "train: {}\n", {"hidden_size": 8})


def test_save_writes_layout_moves_latest_and_keeps_last_k(tmp_path):
    manager = CheckpointManager(tmp_path, ONE, keep=2, portable=False)
    assert manager.latest_tag() is None
    for step in (10, 20, 30):
        save(manager, step)
    root = tmp_path / "checkpoints"
    assert manager.latest_tag() == "step-00000030"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000020", "step-00000030"]
    final = root / "step-00000030"
    assert json.loads((final / "trainer_state.json").read_text())["tokens_seen"] == 300
    assert (final / "rank_state" / "rank-00000.pt").is_file() and (final / "config.yaml").is_file()
    assert json.loads((final / "model_config.json").read_text()) == {"hidden_size": 8}
    assert manager.read_trainer_state("step-00000030").data_state == {"samples_consumed": 30}
    assert not list(root.glob(".*"))  # no temporary left behind


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    manager = CheckpointManager(tmp_path, ONE, keep=3, portable=False)
    save(manager, 1)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError) as info:
        save(manager, 2, FakeEngine(fail_with=full))
    message = str(info.value)
    assert "step-00000002" in message and "No space left on device" in message
    assert "The previous checkpoint (step-00000001) is intact" in message
    assert manager.latest_tag() == "step-00000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_partial_saves_are_cleaned_and_a_broken_latest_is_reported(tmp_path):
    manager = CheckpointManager(tmp_path, ONE, keep=3, portable=False)
    save(manager, 1)
    partial = tmp_path / "checkpoints" / ".tmp-step-00000002"
    partial.mkdir()
    manager.clean_partial_saves()
    assert not partial.exists() and manager.latest_tag() == "step-00000001"
    write_atomic(tmp_path / "checkpoints" / "latest", b"step-00000009")
    with pytest.raises(CheckpointError, match="names 'step-00000009', which is not a complete checkpoint"):
        manager.latest_tag()


def test_unwritable_run_directory_is_a_checkpoint_error(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    manager = CheckpointManager(blocker, ONE, keep=1, portable=False)
    with pytest.raises(CheckpointError, match="could not save checkpoint .*previous checkpoint \\(none yet\\)"):
        save(manager, 1)


# ---------------------------------------------------------------------------- resuming: damaged checkpoints
def _damage(root: Path, how: str) -> None:
    """Damage the newest of the checkpoints saved by `saved_run` (step 3) the way a user or a disk might."""
    newest = root / "checkpoints" / "step-00000003"
    if how == "missing file":
        (newest / "rank_state" / "rank-00000.pt").unlink()
    elif how == "truncated file":
        shard = newest / "mp_rank_00_model_states.pt"
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "corrupt json":
        (newest / "trainer_state.json").write_text('{"step": 3, "tokens_')
    elif how == "latest names a removed checkpoint":
        shutil.rmtree(newest)
    elif how == "latest removed":
        (root / "checkpoints" / "latest").unlink()


def saved_run(root: Path, keep: int = 3) -> CheckpointManager:
    manager = CheckpointManager(root, ONE, keep=keep, portable=False)
    for step in (1, 2, 3):
        save(manager, step)
    return manager


@pytest.mark.parametrize("how, message", [
    ("missing file", r"step-00000003 is damaged: rank_state/rank-00000.pt is missing\. "),
    ("truncated file", r"step-00000003 is damaged: mp_rank_00_model_states.pt has 100 bytes, [\d,]+ when it was "
                       r"saved \(truncated or overwritten\)\. "),
    ("corrupt json", r"step-00000003 is damaged: trainer_state.json is not readable JSON \(.*\)\. "),
    ("latest names a removed checkpoint", r"latest names 'step-00000003', which is not a complete checkpoint\. "),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_checkpoint_before(tmp_path, how, message):
    manager = saved_run(tmp_path)
    assert manager.find_resumable().state.step == 3  # intact: found and read
    _damage(tmp_path, how)
    with pytest.raises(ResumeError) as info:
        manager.find_resumable()
    text = str(info.value)
    assert re.search(message, text), text
    assert text.endswith(f"To resume from the checkpoint before it: echo step-00000002 > "
                         f"{tmp_path / 'checkpoints' / 'latest'} and run again") and "\n" not in text
    # what the line says to do works
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    assert manager.find_resumable().state.step == 2


def test_torch_file_damage_finds_changed_and_cut_files_but_not_checksumless_ones(tmp_path):
    import torch.utils.serialization

    from train.checkpoint import torch_file_damage

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.randn(4096), "b": torch.ones(3)}, path)
    assert torch_file_damage(path) is None
    alter_a_byte(path)
    assert torch_file_damage(path) == ("altered since it was saved (its entry weights/data/0 fails the checksum saved "
                                       "with it)")
    found = [torch_file_damage(path, part, 3) for part in range(3)]  # a third of the entries each
    assert found.count(None) == 2 and "altered since it was saved" in str(found)
    path.write_bytes(path.read_bytes()[:-100])
    assert torch_file_damage(path).startswith("not a complete torch file (truncated or overwritten: ")
    save_config = torch.utils.serialization.config.save
    save_config.compute_crc32 = False  # every CRC written as 0: nothing to check against, not damage
    try:
        torch.save({"w": torch.randn(4096)}, path)
    finally:
        save_config.compute_crc32 = True
    assert torch_file_damage(path) is None


def test_checkpoints_without_latest_or_without_a_good_one_say_what_to_do(tmp_path):
    manager = saved_run(tmp_path)
    _damage(tmp_path, "latest removed")  # a crash between a save's rename and `latest`: the newest that reads
    assert manager.find_resumable().state.step == 3 and "resuming from the newest complete checkpoint" in manager.note
    (tmp_path / "checkpoints" / "step-00000003" / "trainer_state.json").write_text("{")
    assert CheckpointManager(tmp_path, ONE, keep=2).find_resumable().state.step == 2
    only = saved_run(tmp_path / "keep-one", keep=1)
    _damage(tmp_path / "keep-one", "corrupt json")
    with pytest.raises(ResumeError, match="No other complete checkpoint is left in .*: start a new run with another"):
        only.find_resumable()
    assert CheckpointManager(tmp_path / "new", ONE, keep=1).find_resumable() is None  # a new run


def test_a_save_replaces_a_checkpoint_left_from_before_a_rollback(tmp_path):
    """After `echo step-00000002 > latest` (the way back from a damaged step 3) the run saves step 3 again:
    the new one replaces the damaged one, instead of `latest` being pointed at it."""
    manager = saved_run(tmp_path)
    _damage(tmp_path, "truncated file")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    manager.save(FakeEngine(), TrainerState(step=3, tokens_seen=31), {"rng": 1, "data": {}}, "train: {}\n", {})
    assert manager.find_resumable().state.tokens_seen == 31
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_checkpoints_after_a_rollback_do_not_count_as_the_newest(tmp_path):
    """keep=2 with step 4 left from before rolling back to step 2: the saves of steps 3 and 4 again keep
    2 and 3, then 3 and 4 (the stale step 4 would otherwise push out step 2 and stay as 'newest')."""
    manager = saved_run(tmp_path, keep=3)
    save(manager, 4)
    manager.keep = 2
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")

    def tags() -> list[str]:
        return sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))

    save(manager, 3)
    assert tags() == ["step-00000002", "step-00000003"]
    save(manager, 4)
    assert tags() == ["step-00000003", "step-00000004"]


# ---------------------------------------------------------------------------- resuming: changed configs
def test_a_resume_refuses_changes_of_what_the_checkpoint_fixes_and_allows_the_rest():
    def run_config(*sets: str) -> tuple[dict, dict, frozenset]:
        config = load_config(REPO / "configs" / "train" / "tiny-cpu.yaml", list(sets))
        model = load_model_config(config.model, config.source)
        return config.to_dict(), model.to_dict(), model.execution_fields

    saved, saved_model, _ = run_config()
    # what the checkpoint file holds: the YAML and JSON the trainer wrote
    checkpoint = Checkpoint(Path("ckpt"), TrainerState(), yaml.safe_load(yaml.safe_dump(saved, sort_keys=False)),
                            json.loads(json.dumps(saved_model, sort_keys=True)))
    allowed = ("train.max_steps=500", "train.log_every=5", "train.checkpoint_every=10", "train.schedule=wsd",
               "train.warmup_steps=50", "train.min_lr_ratio=0.0", "train.eval_every=20", "optimizer.lr=5.0e-4",
               "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.zero_optimization.stage=2",
               "model.gradient_checkpointing_layers=true", "model.memory_kernel=torch", "data.shuffle_window_shards=2",
               "data.allow_changed_data=true", "data.seq_len=32")  # seq_len: allowed with allow_changed_data
    assert config_changes(checkpoint, *run_config(*allowed)) == []
    changed = run_config("model.hidden_size=64", "optimizer.name=muon", "optimizer.weight_decay=0.0",
                         "optimizer.matrix.ns_steps=3", "train.seed=7", "data.seq_len=32", "train.max_steps=500")
    assert config_changes(checkpoint, *changed) == [
        "model.hidden_size: 128 -> 64", "optimizer.name: adamw -> muon", "optimizer.weight_decay: 0.1 -> 0.0",
        "optimizer.matrix.ns_steps: 5 -> 3", "train.seed: 0 -> 7", "data.seq_len: 64 -> 32"]


# ---------------------------------------------------------------------------- bad run directories
def test_bad_run_directories_are_one_line(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    assert check_run_dir(str(a_file)) == (f"--run-dir {a_file}: a file is there; expected a directory (a new one, "
                                          "or an earlier run's to resume it)")
    assert check_run_dir(str(a_file / "run" / "x")) == (f"--run-dir {a_file / 'run' / 'x'}: {a_file} is a file, so no "
                                                        "directory can be made under it")
    (tmp_path / "run1" / "metrics.jsonl").mkdir(parents=True)
    assert check_run_dir(str(tmp_path / "run1")).endswith("metrics.jsonl is a directory; expected a file")
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "checkpoints").write_text("")
    assert check_run_dir(str(tmp_path / "run2")).endswith("checkpoints is a file; expected a directory")
    assert check_run_dir(str(tmp_path / "new" / "run")) is None and (tmp_path / "new" / "run").is_dir()
    assert list((tmp_path / "new" / "run").iterdir()) == []  # the write test leaves nothing


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    if os.geteuid() != 0:  # permissions bind whoever is not root
        parent = tmp_path / "read-only"
        parent.mkdir(mode=0o500)
    else:  # root writes anywhere but where the kernel refuses everyone
        parent = Path("/sys/hope-train-test")
        if not _mkdir_fails(parent):
            pytest.skip("no directory refuses root's writes here")
    message = check_run_dir(str(parent / "run"))
    assert message is not None and message.startswith(f"--run-dir {parent / 'run'}: cannot write there ("), message


def _mkdir_fails(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return True
    path.rmdir()
    return False


def test_the_plan_line_counts_the_tokens_of_a_resumed_run():
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2}
    assert plan_line("tiny", 100, 1, ds, 32, 6, "x epochs", tokens=640).endswith("| 6 steps = 640 tokens, x epochs")
    assert plan_line("tiny", 100, 1, ds, 32, 6, "x epochs").endswith("| 6 steps = 384 tokens, x epochs")


# ---------------------------------------------------------------------------- resuming, with real ranks


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run config, run dir): a tiny HOPE trained 4 steps on 2 gloo ranks, checkpoints at steps 2 and 4.
    Its batch is set by accumulation (no train_batch_size), so the global batch follows the ranks."""
    from data_pipeline import prepare_default_corpus

    root = tmp_path_factory.mktemp("resume")
    prepared = prepare_default_corpus(root / "data", vocab_size=512)
    config = {
        "model": {"config": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 512},
        "data": {"path": str(prepared.data_dir), "seq_len": 32},
        "train": {"max_steps": 4, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "eval_batches": 1,
                  "seed": 1, "progress_bar": False},
        "optimizer": {"name": "adamw", "lr": 2e-3},
        "deepspeed": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 0}},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    rc, output = launch(root / "run.yaml", root / "base", nproc=2)
    assert rc == 0 and "checkpoint saved: " in output, output[-3000:]
    return root / "run.yaml", root / "base"


def launch(config: Path, run_dir: Path, *sets: str, nproc: int = 1, timeout: float = 300) -> tuple[int, str]:
    """`hope-train` on `nproc` gloo ranks (launch/train.sh; one: a bare process); (exit status, output)."""
    args = [str(config), "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    command = ([sys.executable, "-m", "train.cli", *args] if nproc == 1 else
               ["bash", str(REPO / "launch" / "train.sh"), "--cpu", "--nproc", str(nproc), *args])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a rank waiting for another forever: kill them all, fail
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, output


def copy_run(base: Path, name: str) -> Path:
    return Path(shutil.copytree(base, base.parent / name))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "hope-train: error:" in line]


def test_a_damaged_checkpoint_stops_every_rank_with_the_same_one_line(base_run):
    """2 ranks: each finds the damage itself before loading (a file missing or unreadable), or the ranks
    share the checksum checks of the files the resume reads (a byte changed inside, same size), or agree
    after loading (a valid torch file of the wrong content, found only when rank 1 loads its own rank
    state); both exit 2, one line, no traceback."""
    config, base = base_run

    def wrong_content(file: Path) -> None:  # a complete torch file, listed at its size: only loading it tells
        torch.save({"step": 4}, file)
        listed = file.parents[1] / "checkpoint_files.json"
        sizes = json.loads(listed.read_text())
        listed.write_text(json.dumps({**sizes, "rank_state/rank-00001.pt": file.stat().st_size}))

    cases = {
        "missing": ("rank_state/rank-00001.pt", lambda f: f.unlink(), "rank_state/rank-00001.pt is missing"),
        "corrupt-json": ("trainer_state.json", lambda f: f.write_text("{"), "trainer_state.json is not readable JSON"),
        "altered": ("mp_rank_00_model_states.pt", alter_a_byte,  # before: loaded with one weight changed
                    "checkpoint {ckpt} is damaged: mp_rank_00_model_states.pt: altered since it was saved (its entry "),
        "wrong-content": ("rank_state/rank-00001.pt", wrong_content,
                          "could not load checkpoint {ckpt}: CheckpointError: rank_state/rank-00001.pt holds no RNG "
                          "and loader state"),
    }
    for name, (file, damage, expected) in cases.items():
        run_dir = copy_run(base, f"damaged-{name}")
        checkpoint = run_dir / "checkpoints" / "step-00000004"
        damage(checkpoint / file)
        rc, output = launch(config, run_dir, nproc=2, timeout=240)
        assert rc == 2, (name, output[-3000:])
        assert "Traceback" not in output, (name, output[-3000:])
        (line,) = error_lines(output)  # printed once: every rank raised the same error
        assert expected.format(ckpt=checkpoint) in line, (name, line)
        # rank 0 read its own rank state fine; the checksums are shared out entry by entry
        found_by = {"wrong-content": [" (found by rank 1)"], "altered": ["", " (found by rank 1)"]}.get(name, [""])
        way_back = f"To resume from the checkpoint before it: echo step-00000002 > {run_dir / 'checkpoints' / 'latest'}"
        assert any(line.endswith(f"{way_back} and run again{by}") for by in found_by), (name, line)
        assert not (checkpoint.parent / "step-00000006").exists()


def test_a_resume_on_a_changed_model_optimizer_or_seq_len_is_refused_in_one_line(base_run):
    config, base = base_run
    run_dir = copy_run(base, "changed-config")
    rc, output = launch(config, run_dir, "train.max_steps=6", "model.hidden_size=32", "optimizer.name=muon",
                        "data.seq_len=16")
    assert rc == 2 and "Traceback" not in output, output[-3000:]
    (line,) = error_lines(output)
    checkpoint = run_dir / "checkpoints" / "step-00000004"
    assert line == (f"hope-train: error: cannot resume from {checkpoint}: this config changes what the checkpoint "
                    "fixes: model.hidden_size: 64 -> 32, optimizer.name: adamw -> muon, data.seq_len: 32 -> 16. Set "
                    f"them back (the checkpoint's config: {checkpoint / 'config.yaml'}), or let data.seq_len change "
                    "with data.allow_changed_data: true, or give another --run-dir for a new run")


def test_a_resume_on_another_world_size_and_seq_len_says_what_changed(base_run):
    """2 ranks x micro 2 = 4 sequences a step, resumed on 1 rank: 2 a step. The run goes on (the data from
    its position), says so in one line, and plans the tokens the steps before actually read. A changed
    seq_len goes on too with data.allow_changed_data, and says so."""
    config, base = base_run
    run_dir = copy_run(base, "one-rank")
    rc, output = launch(config, run_dir, "train.max_steps=6", "data.seq_len=16", "data.allow_changed_data=true")
    assert rc == 0, output[-3000:]
    assert ("warning: the global batch changed on resume: 2 ranks x micro-batch 2 x accumulation 1 = 4 sequences "
            "per step before, 1 rank x micro-batch 2 x accumulation 1 = 2 now. The data goes on from the checkpoint's "
            "position (no sample repeated or skipped), but the steps left read 2 sequences each; --set "
            "deepspeed.train_batch_size=4 keeps the checkpoint's\n") in output, output[-3000:]
    assert ("warning: data.seq_len changed on resume (32 -> 16, allowed by data.allow_changed_data): the data goes on "
            "from sample 16 of the new length, not from the checkpoint's token\n") in output
    # 4 steps of 4 x 32 tokens, then 2 of 2 x 16
    assert "= 2 sequences of 16 = 32 tokens/step | 6 steps = 576 tokens, " in output
    state = json.loads((run_dir / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["tokens_seen"] == 576 and state["data_state"]["samples_consumed"] == 16 + 2 * 2


def test_a_resume_on_another_zero_stage_loads_the_portable_state(base_run):
    """DeepSpeed's shards of ZeRO-0 do not load into ZeRO-2 (a missing zero_pp_rank file); the portable
    state does, and the run goes on as it would have on ZeRO-0 (2 ranks both)."""
    config, base = base_run
    runs = {}
    for stage in (0, 2):
        run_dir = copy_run(base, f"stage-{stage}")
        rc, output = launch(config, run_dir, "train.max_steps=6", f"deepspeed.zero_optimization.stage={stage}", nproc=2)
        assert rc == 0, output[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[stage] = {record["step"]: record for record in records}  # a resumed run rewrites steps after 4
    for step in (5, 6):
        assert abs(runs[2][step]["loss"] - runs[0][step]["loss"]) < 1e-4, step
        assert runs[2][step]["data_fingerprint"] == runs[0][step]["data_fingerprint"]


def test_a_bad_run_directory_stops_the_launch_in_one_line(base_run, tmp_path):
    config, _ = base_run
    a_file = tmp_path / "run"
    a_file.write_text("")
    rc, output = launch(config, a_file, nproc=2, timeout=120)
    assert rc == 2 and "Traceback" not in output, output[-3000:]
    assert f"hope-train: error: --run-dir {a_file}: a file is there" in output

# ---------------------------------------------------------------------------- schedules
def test_cosine_warms_up_peaks_and_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, 100, "cosine", warmup_steps=10, min_lr_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    lrs = [lr_at(s, 2.0, 100, "wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2) for s in range(101)]
    assert lrs[4] == pytest.approx(2.0) and lrs[5:80] == [2.0] * 75
    assert lrs[90] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.0)
    assert lr_at(50, 2.0, 100, "constant", warmup_steps=5) == 2.0


def test_apply_lr_uses_each_groups_scale():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.5}], lr=1.0)
    apply_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]


def test_metrics_line_has_the_issue_fields():
    line = format_line({"step": 7, "loss": 2.5, "grad_norm": 0.5, "lr": 3e-4, "tokens_per_s": 12345.6,
                        "mfu": 0.412, "peak_mem_gb": 12.3, "val_loss": 2.0, "val_ppl": math.exp(2.0)})
    assert line == ("step 7 | loss 2.5000 | grad 0.500 | lr 3.00e-04 | tok/s 12,346 | mfu 41.2% | "
                    "mem 12.30 GiB | val 2.0000 (ppl 7.4)")
    repeating = format_line({"step": 8, "loss": 2.5, "lr": 3e-4, "tokens_per_s": 1.0, "peak_mem_gb": 1.0,
                             "skipped_steps": 0, "data_epoch": 2, "eta_s": 3 * 86400 + 4 * 3600 + 59})
    assert repeating.endswith("| mem 1.00 GiB | eta 3d04h | data epoch 2")
    mixture = format_line({"step": 9, "loss": 2.5, "lr": 3e-4, "tokens_per_s": 1.0, "peak_mem_gb": 1.0, "eta_s": 0.0,
                           "val_loss": 2.0, "val_ppl": 7.4, "val_loss/web": 1.9, "val_loss/code": 2.3})
    assert mixture.endswith("| mem 1.00 GiB | val 2.0000 (ppl 7.4; web 1.9000, code 2.3000)")
    assert [duration(s) for s in (0.4, 42, 312, 7980, 86400)] == ["0s", "42s", "5m12s", "2h13m", "1d00h"]
    assert [amount(n) for n in (5120, 341_495_040, 15.0e9)] == ["5,120", "341.5M", "15.0B"]
