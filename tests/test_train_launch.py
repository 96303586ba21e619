"""The trainer end to end: real ranks (2 gloo processes through launch/train.sh), kills, signals.

Every run trains the same tiny HOPE (width 64, 2 layers, seq 32) for 6 steps on the embedded
corpus with a global batch of 8 sequences, so all runs can be compared step by step with one
uninterrupted reference run. Launches are the expensive part (~15 s each on 2 cores): each test
reuses its runs for several assertions.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from train.distributed import _free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "train.sh"
MAX_STEPS = 6
TOKENS_PER_STEP = 8 * 32
LOSS_TOLERANCE = 1e-6  # the bound for an exact resume (fp32)
# Another world size sums the same gradients in another order: equal up to float rounding.
RESHARD_TOLERANCE = 1e-4

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The run config every test starts from (and the data prepared once for all)."""
    from data_pipeline import prepare_default_corpus

    root = tmp_path_factory.mktemp("train_launch")
    prepared = prepare_default_corpus(root / "data", vocab_size=512)
    config = {
        "model": {"config": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 512},
        "data": {"path": str(prepared.data_dir), "seq_len": 32},
        "train": {"max_steps": MAX_STEPS, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 2,
                  "eval_every": 3, "eval_batches": 1, "warmup_steps": 1, "seed": 1, "progress_bar": False},
        "optimizer": {"name": "adamw", "lr": 2e-3},
        "deepspeed": {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 8, "gradient_clipping": 1.0,
                      "zero_optimization": {"stage": 0}},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    return {**env, **(extra or {})}


def start(workdir: Path, run_dir: Path, *sets: str, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """2 ranks through launch/train.sh, or (nproc=1) a bare single-process `python -m train.cli`."""
    args = [str(workdir / "run.yaml"), "--run-dir", str(run_dir)]
    for assignment in sets:
        args += ["--set", assignment]
    if nproc == 1:
        command = [sys.executable, "-m", "train.cli", *args]
    else:
        command = ["bash", str(LAUNCH), "--cpu", "--nproc", str(nproc), *args]
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(env), cwd=REPO,
                            start_new_session=True)


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return rc, (run_dir.parent / f"{run_dir.name}.log").read_text()


def run(workdir: Path, run_dir: Path, *sets: str, nproc: int = 2, env: dict | None = None) -> tuple[int, str]:
    return finish(start(workdir, run_dir, *sets, nproc=nproc, env=env), run_dir)


def records(run_dir: Path) -> dict[int, dict]:
    """The last metrics record of every step (a resumed run rewrites the steps after its checkpoint)."""
    out = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["step"]] = record
    return out


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(records(run_dir), default=0) < step:
        assert process.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.2)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def trainer_state(run_dir: Path, tag: str | None = None) -> dict:
    return json.loads((run_dir / "checkpoints" / (tag or latest(run_dir)) / "trainer_state.json").read_text())


def assert_same_steps(run: dict[int, dict], reference: dict[int, dict], tolerance: float) -> None:
    assert sorted(run) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        got, want = run[step], reference[step]
        assert abs(got["loss"] - want["loss"]) <= tolerance, (step, got["loss"], want["loss"])
        # the same sequences in every step: no token seen twice or skipped across the restart
        assert got["data_fingerprint"] == want["data_fingerprint"], step
        assert got["tokens_seen"] == step * TOKENS_PER_STEP


# ---------------------------------------------------------------------------- the reference
@pytest.fixture(scope="module")
def reference(workdir) -> tuple[Path, dict[int, dict], str]:
    run_dir = workdir / "reference"
    port = str(_free_port())
    rc, output = run(workdir, run_dir, env={"MASTER_PORT": port})
    assert rc == 0, output[-3000:]
    # DeepSpeed's shared-memory all-reduce op (inference only) is neither built nor started on
    # CPU: it would map 64 MiB per rank in /dev/shm and never unlink it (train.distributed).
    leaked = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked and "shm_comm" not in output, leaked
    return run_dir, records(run_dir), output


def test_zero0_two_ranks_logs_validates_and_keeps_last_checkpoints(reference):
    run_dir, steps, output = reference
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    for record in steps.values():
        assert math.isfinite(record["loss"]) and record["tokens_per_s"] > 0 and record["lr"] > 0
        assert record["grad_norm"] is not None and record["peak_mem_gb"] > 0
    assert [s for s, r in steps.items() if r.get("val_loss") is not None] == [3, 6]
    assert steps[6]["val_ppl"] == pytest.approx(math.exp(steps[6]["val_loss"]))
    assert "step 6 | loss" in output and f"checkpoint: {run_dir / 'checkpoints' / 'step-00000006'}" in output
    assert "ranks x micro-batch 2 x accumulation 2 = 8 sequences of 32 = 256 tokens/step | 6 steps = 1,536 tokens" in output
    saved = re.findall(r"checkpoint saved: \S+step-0000000(\d) \((\d+\.\d\d) GB in \d+\.\d s\)", output)
    assert [step for step, _ in saved] == ["2", "4", "6"], saved  # with its size and time
    # keep_checkpoints=2: steps 2 and 4 were saved, only the last two remain
    checkpoints = run_dir / "checkpoints"
    assert latest(run_dir) == "step-00000006"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000004", "step-00000006"]
    final = checkpoints / "step-00000006"
    for name in ("trainer_state.json", "config.yaml", "model_config.json", "optimizer_portable.pt",
                 "rank_state/rank-00000.pt", "rank_state/rank-00001.pt"):
        assert (final / name).is_file(), name
    state = trainer_state(run_dir)
    assert state["step"] == MAX_STEPS and state["tokens_seen"] == MAX_STEPS * TOKENS_PER_STEP
    assert state["world_size"] == 2 and state["data_state"]["samples_consumed"] == MAX_STEPS * 8
    assert yaml.safe_load((final / "config.yaml").read_text())["train"]["max_steps"] == MAX_STEPS
    assert json.loads((final / "model_config.json").read_text())["hidden_size"] == 64


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("stage", [1, 3])
def test_sigkill_and_restart_repeats_the_uninterrupted_run(workdir, reference, stage):
    """SIGKILL every process mid-run, start again: same per-step losses, same batches. (ZeRO-2 is
    killed and restarted with M3, below.)"""
    run_dir = workdir / f"killed-zero{stage}"
    stage_set = f"deepspeed.zero_optimization.stage={stage}"
    process = start(workdir, run_dir, stage_set)
    wait_for_step(process, run_dir, 3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert latest(run_dir) in ("step-00000002", "step-00000004")  # killed before the end
    rc, output = run(workdir, run_dir, stage_set)
    assert rc == 0, output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in output
    assert_same_steps(records(run_dir), reference[1], LOSS_TOLERANCE)
    # the parameters are counted before ZeRO-3 partitions them
    plan = re.compile(r"model tiny: ([\d,.]+M?) parameters")
    assert plan.search(output).group(1) == plan.search(reference[2]).group(1)


def test_sigkill_and_restart_with_m3_repeats_the_uninterrupted_run(workdir):
    """The same exactness with the M3 optimizer (issue 6): its fast, slow and second-moment state
    and the CMS levels' summed gradients come back from the checkpoint exactly (ZeRO-2)."""
    # slow momentum every 2 steps and the slow CMS level every 2 steps (512 tokens): both fire
    # between the checkpoint and the kill
    sets = ("deepspeed.zero_optimization.stage=2", "optimizer.name=m3", "optimizer.lr=0.01",
            "optimizer.m3.slow_every=2", "model.cms_periods=[0,512]")
    rc, output = run(workdir, workdir / "m3-reference", *sets)
    assert rc == 0, output[-3000:]
    reference = records(workdir / "m3-reference")
    run_dir = workdir / "m3-killed"
    process = start(workdir, run_dir, *sets)
    wait_for_step(process, run_dir, 3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    rc, output = run(workdir, run_dir, *sets)
    assert rc == 0, output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in output
    assert_same_steps(records(run_dir), reference, LOSS_TOLERANCE)


# ---------------------------------------------------------------------------- preemption, W&B, resharding
def test_preemption_signal_saves_and_resume_on_one_rank_continues_wandb_run(workdir, reference):
    """SIGUSR1 to one rank: every rank saves at the end of that step and the job exits cleanly.
    The job then resumes on ONE rank from the ZeRO-2 shards (world size 2 -> 1), same W&B run."""
    run_dir = workdir / "preempted"
    sets = ("deepspeed.zero_optimization.stage=2", "train.wandb=offline")
    process = start(workdir, run_dir, *sets)
    wait_for_step(process, run_dir, 1)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "train.cli" in " ".join(p.cmdline()) and "--local_rank" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGUSR1)
    rc, output = finish(process, run_dir)
    assert rc == 0, output[-3000:]
    stopped = trainer_state(run_dir)["step"]
    assert 1 <= stopped < MAX_STEPS and "preempted (signal)" in output
    assert latest(run_dir) == f"step-{stopped:08d}"
    wandb_id = trainer_state(run_dir)["wandb_id"]
    assert wandb_id and list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))

    rc, output = run(workdir, run_dir, *sets, nproc=1)
    assert rc == 0, output[-3000:]
    final = trainer_state(run_dir)
    assert final["step"] == MAX_STEPS and final["world_size"] == 1 and final["wandb_id"] == wandb_id
    assert_same_steps(records(run_dir), reference[1], RESHARD_TOLERANCE)


# ---------------------------------------------------------------------------- faults
def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(workdir):
    run_dir = workdir / "nonfinite"
    rc, output = run(workdir, run_dir, "train.max_steps=8", "train.max_bad_steps=3", nproc=1,
                     env={"HOPE_FAULT_NAN_STEPS": "2,5,6,7"})
    assert rc == 1
    assert "3 non-finite losses in a row (steps 5-7)" in output and "last good checkpoint is step-00000004" in output
    assert "Traceback" not in output
    steps = records(run_dir)
    assert math.isnan(steps[2]["loss"]) and steps[3]["skipped_steps"] == 1 and math.isfinite(steps[3]["loss"])
    assert steps[7]["skipped_steps"] == 4 and 8 not in steps
    assert latest(run_dir) == "step-00000004" and trainer_state(run_dir)["skipped_steps"] == 1


def test_full_disk_at_save_is_a_clear_error_and_keeps_the_previous_checkpoint(workdir):
    run_dir = workdir / "full-disk"
    rc, output = run(workdir, run_dir, nproc=1, env={"HOPE_FAULT_SAVE_ENOSPC_AT": "4"})
    assert rc == 1
    assert "could not save checkpoint" in output and "No space left on device" in output
    assert "The previous checkpoint (step-00000002) is intact" in output and "Traceback" not in output
    assert latest(run_dir) == "step-00000002"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_crash_in_the_middle_of_a_save_loses_nothing(workdir, reference):
    run_dir = workdir / "crash-in-save"
    rc, _ = run(workdir, run_dir, nproc=1, env={"HOPE_FAULT_CRASH_IN_SAVE_AT": "4"})
    assert rc == 17  # died with a half-written checkpoint on disk
    assert latest(run_dir) == "step-00000002"
    assert (run_dir / "checkpoints" / ".tmp-step-00000004").is_dir()
    rc, output = run(workdir, run_dir, nproc=1)
    assert rc == 0, output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000002'}" in output
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    # one rank with 4 micro-batches of accumulation: the 2-rank reference up to float rounding
    assert_same_steps(records(run_dir), reference[1], RESHARD_TOLERANCE)


def test_launcher_refuses_an_invalid_config_before_any_process_group(workdir):
    run_dir = workdir / "invalid"
    rc, output = run(workdir, run_dir, "deepspeed.zero_optimization.stage=5")
    assert rc != 0
    assert f"{workdir / 'run.yaml'}: deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got 5" in output
    assert "Traceback" not in output and not run_dir.exists()


def test_compiled_blocks_train_as_the_eager_model_does(workdir, reference):
    """train.compile under ZeRO-2, one process: every step's loss as the eager 2-rank reference's
    (validation too, on its own batches: one rank validates on fewer sequences)."""
    run_dir = workdir / "compiled"
    rc, output = run(workdir, run_dir, "train.compile=true", "deepspeed.zero_optimization.stage=2", nproc=1)
    assert rc == 0, output[-3000:]
    assert "compiling 2 blocks" in output
    steps = records(run_dir)
    assert_same_steps(steps, reference[1], RESHARD_TOLERANCE)
    assert all(math.isfinite(steps[step]["val_loss"]) for step in (3, 6))

    # a compiler that fails (here: no working C++ compiler for inductor) is one line, not a traceback
    broken = {"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-without-compiler")}
    rc, output = run(workdir, workdir / "compile-fails", "train.compile=true", nproc=1, env=broken)
    assert rc == 1 and "hope-train: error: torch.compile failed: InvalidCxxCompiler" in output, output[-3000:]
    assert "--set train.compile=false" in output and "Traceback" not in output


def test_a_mixture_of_two_datasets_trains_resumes_on_new_weights_and_exports(workdir, reference):
    """One process trains on {the corpus: 0.75, a second dataset of its first documents: 0.25}, each
    read a window of one shard at a time; the run resumes on other weights only when the config
    allows changed data."""
    from data_pipeline import TokenLoader, prepare_default_corpus
    from data_pipeline.tokenize import TokenizeSettings, tokenize_to_shards
    from train.export_tokenizer import tokenizer_for_run

    prepared = prepare_default_corpus(workdir / "data", vocab_size=512)
    lines = (prepared.data_dir.parent / "corpus.jsonl").read_text().splitlines()[:300]
    (workdir / "second.jsonl").write_text("\n".join(lines) + "\n")
    second = workdir / "second"
    tokenize_to_shards([str(workdir / "second.jsonl")], str(prepared.tokenizer_path), str(second),
                       TokenizeSettings(validation_fraction=0.2, workers=0), progress=False)
    run_dir = workdir / "mixture"
    def mixture(share: float) -> str:
        return f"data.mixture={{{prepared.data_dir}: {1 - share}, {second}: {share}}}"

    rc, output = run(workdir, run_dir, "data.path=default", mixture(0.25), "data.shuffle_window_shards=1", nproc=1)
    assert rc == 0, output[-3000:]
    steps = records(run_dir)
    assert sorted(steps) == list(range(1, MAX_STEPS + 1)) and steps[6]["val_loss"] is not None
    assert all(math.isfinite(r["loss"]) for r in steps.values())
    assert re.search(rf"epochs of each dataset: {prepared.data_dir.name} [\d.]+, second [\d.]+\n", output), output[-3000:]
    # each dataset validated on its own; val_loss is their mean under the mixture's weights
    first, second_loss = steps[6][f"val_loss/{prepared.data_dir.name}"], steps[6]["val_loss/second"]
    assert first != second_loss and abs(steps[6]["val_loss"] - (0.75 * first + 0.25 * second_loss)) < 1e-9
    assert f"{prepared.data_dir.name} {first:.4f}, second {second_loss:.4f})" in output
    state = trainer_state(run_dir)["data_state"]
    assert state["samples_consumed"] == MAX_STEPS * 8
    assert state["fingerprint"] != trainer_state(reference[0])["data_state"]["fingerprint"]
    windowed = {str(prepared.data_dir): 0.75, str(second): 0.25}
    with TokenLoader(windowed, 32, 8, 0, 1, seed=0, num_workers=0, shuffle_window_shards=1) as loader:
        assert state["fingerprint"] == loader.fingerprint  # the run read the windowed order
    run_config = yaml.safe_load((run_dir / "checkpoints" / latest(run_dir) / "config.yaml").read_text())
    tokenizer, why = tokenizer_for_run(run_config, [REPO])
    assert tokenizer is not None, why

    no_validation = workdir / "no-validation"  # refused before the first step, not at the first evaluation
    tokenize_to_shards([str(workdir / "second.jsonl")], str(prepared.tokenizer_path), str(no_validation),
                       TokenizeSettings(validation_fraction=0.0, workers=0), progress=False)
    rc, output = run(workdir, workdir / "no-validation-run", f"data.path={no_validation}", nproc=1)
    assert rc == 2 and f"{no_validation / 'manifest.json'}: split 'validation' has 0 tokens" in output, output[-3000:]
    assert not records(workdir / "no-validation-run")

    longer = ("data.path=default", mixture(0.5), f"train.max_steps={MAX_STEPS + 2}", "data.shuffle_window_shards=1")
    rc, output = run(workdir, run_dir, *longer, nproc=1)
    assert rc == 2 and "the manifest or the mixture changed since the checkpoint" in output, output[-3000:]
    assert "data.allow_changed_data: true" in output and "Traceback" not in output
    rc, output = run(workdir, run_dir, *longer, "data.allow_changed_data=true", nproc=1)
    assert rc == 0, output[-3000:]
    reads = {e["dataset"]: e["reads"] for e in trainer_state(run_dir, "step-00000006")["data_state"]["reads"]}
    assert (f"data changed, each dataset goes on: {prepared.data_dir} at read {reads[str(prepared.data_dir)]}, "
            f"{second} at read {reads[str(second)]}\n") in output, output[-3000:]
    assert "resumed from" in output and sorted(records(run_dir)) == list(range(1, MAX_STEPS + 3))
    data_state = trainer_state(run_dir)["data_state"]
    assert data_state["samples_consumed"] == (MAX_STEPS + 2) * 8
    # the new weights took over at step 6, each dataset going on from its own reads
    assert data_state["phase_start"] == MAX_STEPS * 8 and sum(e["reads"] for e in data_state["reads"]) == (MAX_STEPS + 2) * 8
