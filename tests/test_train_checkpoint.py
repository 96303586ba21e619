"""Checkpoint bookkeeping (atomic save, `latest`, keep-K, failures) and the LR schedules, in-process."""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch

from train.checkpoint import CheckpointError, CheckpointManager, TrainerState, write_atomic
from train.distributed import World
from train.metrics import amount, duration, format_line
from train.schedule import apply_lr, lr_at

ONE = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one shard file per save, can fail like a full disk."""

    def __init__(self, fail_with: OSError | None = None):
        self.fail_with = fail_with

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = True):
        assert not save_latest  # `latest` is ours, written only after every rank finished
        path = Path(root) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
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
