"""train.optim inside DeepSpeed on real ranks (2 gloo processes on CPU), ZeRO 0-3.

pytest side: one 2-rank launch of this same file (`main`) runs every stage x optimizer; one 1-rank
launch (`resume`) restores the 2-rank checkpoints. Each launch costs ~10-20 s of start-up.

Worker side (run under torchrun, DS_ACCELERATOR=cpu, gloo):
  main OUT   (2 ranks) for ZeRO 0-3 x adamw/muon/m3: the DeepSpeed update equals the
             single-process update; Newton-Schulz work is split across ranks, not repeated;
             no attach_engine is an error; engine.save_checkpoint/load_checkpoint resumes
             bit-exactly; writes portable states.
  resume OUT (1 rank)  loads the 2-rank portable states under every stage, checks the restored
             state is bit-identical and that training continues like the 2-rank run.
Prints one line per check; exits 1 if any failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train.optim.hope_optimizer as hope_optimizer  # noqa: E402
from tests.test_optim_models import TinyHopeLike, make_batches  # noqa: E402
from train.distributed import start_process_group  # noqa: E402
from train.optim import OptimizerConfig, OptimizerSetupError, attach_engine, build_optimizer  # noqa: E402
from train.optim.checkpoint import load_portable_state, portable_state, save_portable_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, ranks: int, out_dir: Path) -> tuple[int, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={_free_port()}", str(WORKER), mode, str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


def _checks(output: str) -> list[str]:
    """The check lines of the workers (a launcher may prefix a line with its own text)."""
    found = set()
    for line in output.splitlines():
        for marker in ("ok   ", "FAIL "):
            if marker in line:
                found.add(line[line.index(marker):])
    return sorted(found)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("optim_zero")
    rc, output = _launch("main", 2, out_dir)
    return rc, output, out_dir


@pytest.mark.timeout(300)
def test_zero_stages_match_single_process_and_resume_exactly(two_rank_run):
    rc, output, _ = two_rank_run
    checks = _checks(output)
    failed = [c for c in checks if c.startswith("FAIL")]
    assert rc == 0 and not failed, "\n".join(failed) or output[-6000:]
    # Every stage x optimizer was compared, NS work was split, every stage resumed.
    for stage in range(4):
        for algo in ("adamw", "muon", "m3"):
            assert any(c.startswith(f"ok   ZeRO-{stage} {algo}: 2 ranks == 1 process") for c in checks)
        for algo in ("muon", "m3"):
            assert any(c.startswith(f"ok   ZeRO-{stage} {algo}: Newton-Schulz calls per rank") for c in checks)
        assert any(c.startswith(f"ok   ZeRO-{stage} m3: save_checkpoint") for c in checks)
    assert "ok   ZeRO-2 muon without attach_engine: OptimizerSetupError" in checks


@pytest.mark.timeout(300)
def test_state_restores_on_another_number_of_ranks(two_rank_run):
    rc, output, out_dir = two_rank_run
    assert rc == 0, output[-6000:]
    rc, output = _launch("resume", 1, out_dir)
    checks = _checks(output)
    failed = [c for c in checks if c.startswith("FAIL")]
    assert rc == 0 and not failed, "\n".join(failed) or output[-6000:]
    assert len(checks) == 12, checks  # 3 checks x 4 stages


# ---------------------------------------------------------------- worker (under torchrun)
GLOBAL_BATCH, SEQ, STEPS, LR = 4, 8, 6, 1e-2
TOKENS_PER_STEP = GLOBAL_BATCH * SEQ
CMS_PERIOD_TOKENS = 2 * TOKENS_PER_STEP  # the slow level updates every 2nd step
ALGOS, STAGES = ("adamw", "muon", "m3"), (0, 1, 2, 3)
RTOL, ATOL = 1e-4, 1e-5
failures: list[str] = []

ns_calls = {"count": 0}


def count_newton_schulz_calls() -> None:
    """Worker only: wrap the optimizer's Newton-Schulz so each rank can count its share."""
    real = hope_optimizer.newton_schulz

    def counting(*args, **kwargs):
        ns_calls["count"] += 1
        return real(*args, **kwargs)

    hope_optimizer.newton_schulz = counting


def check(ok: bool, what: str) -> None:
    # Both ranks share one output stream: only rank 0 reports successes, so that two ranks'
    # lines cannot interleave into one; a failure is reported by whichever rank sees it.
    if not ok or os.environ.get("RANK", "0") == "0":
        print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def optimizer_config(algo: str) -> OptimizerConfig:
    cfg = OptimizerConfig(name=algo, lr=LR)
    cfg.m3.slow_every = 2
    return cfg


def new_model() -> TinyHopeLike:
    torch.manual_seed(1234)
    return TinyHopeLike(cms_period_tokens=CMS_PERIOD_TOKENS)


def reference_run(algo: str, batches) -> tuple[dict[str, torch.Tensor], int]:
    """Single process, whole batch, no DeepSpeed; returns final weights and Newton-Schulz calls."""
    model = new_model()
    opt = build_optimizer(model, optimizer_config(algo), {}, TOKENS_PER_STEP)
    before = ns_calls["count"]
    for tokens in batches:
        model(tokens).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, ns_calls["count"] - before


def make_engine(algo: str, stage: int, attach: bool = True):
    import deepspeed

    world = torch.distributed.get_world_size()
    ds_config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                 "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
                 "steps_per_print": 10**9}
    model = new_model()
    opt = build_optimizer(model, optimizer_config(algo), ds_config, TOKENS_PER_STEP)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    if attach:
        attach_engine(engine)
    return engine


def train(engine, batches) -> None:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    micro = GLOBAL_BATCH // world
    for tokens in batches:
        loss = engine(tokens[rank * micro:(rank + 1) * micro])
        engine.backward(loss)
        engine.step()


def full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=RTOL, atol=ATOL) for k in a)


def main(out_dir: str) -> None:
    batches = make_batches(STEPS, GLOBAL_BATCH, SEQ, seed=7)
    references = {algo: reference_run(algo, batches) for algo in ALGOS}
    start_process_group("gloo", timeout=timedelta(seconds=90))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    figures = {}
    for stage in STAGES:
        for algo in ALGOS:
            engine = make_engine(algo, stage)
            before = ns_calls["count"]
            train(engine, batches)
            mine = torch.tensor([ns_calls["count"] - before])
            per_rank = [torch.zeros_like(mine) for _ in range(world)]
            torch.distributed.all_gather(per_rank, mine)
            per_rank = [int(c) for c in per_rank]
            weights, (ref_weights, ref_calls) = full_weights(engine), references[algo]
            diff = max_diff(weights, ref_weights)
            figures[f"zero{stage}_{algo}_max_abs_diff"] = diff
            check(close(weights, ref_weights), f"ZeRO-{stage} {algo}: 2 ranks == 1 process (max |diff| {diff:.2e})")
            if algo != "adamw":
                check(sum(per_rank) == ref_calls and min(per_rank) > 0,
                      f"ZeRO-{stage} {algo}: Newton-Schulz calls per rank {per_rank}, single process {ref_calls}")
    # Never fall back silently: Newton-Schulz on partitions without the layout is an error.
    engine = make_engine("muon", 2, attach=False)
    try:
        train(engine, batches[:1])
        check(False, "ZeRO-2 muon without attach_engine: raised nothing")
    except OptimizerSetupError as err:
        check("attach_engine" in str(err), "ZeRO-2 muon without attach_engine: OptimizerSetupError")
    # Same-size resume through DeepSpeed's own checkpoint, and portable states for the 1-rank run.
    ckpt_root = os.path.join(out_dir, "ckpt")
    for stage in STAGES:
        engine = make_engine("m3", stage)
        train(engine, batches[:3])
        tag = f"zero{stage}"
        engine.save_checkpoint(ckpt_root, tag=tag)
        save_portable_state(engine, os.path.join(ckpt_root, tag, "optim_portable.pt"))
        train(engine, batches[3:])
        straight = full_weights(engine)
        resumed = make_engine("m3", stage)
        resumed.load_checkpoint(ckpt_root, tag=tag)
        train(resumed, batches[3:])
        again = full_weights(resumed)
        check(all(torch.equal(straight[k], again[k]) for k in straight),
              f"ZeRO-{stage} m3: save_checkpoint at step 3 + load_checkpoint resumes bit-exactly")
        if rank == 0:
            torch.save(straight, os.path.join(ckpt_root, tag, "final_weights_2ranks.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, "figures.json"), "w") as f:
            json.dump(figures, f, indent=1)


def resume(out_dir: str) -> None:
    start_process_group("gloo", timeout=timedelta(seconds=90))
    batches = make_batches(STEPS, GLOBAL_BATCH, SEQ, seed=7)
    ckpt_root = os.path.join(out_dir, "ckpt")
    for stage in STAGES:
        path = os.path.join(ckpt_root, f"zero{stage}", "optim_portable.pt")
        saved = torch.load(path, weights_only=True)
        engine = make_engine("m3", stage)
        load_portable_state(engine, path)
        restored = portable_state(engine)
        same = saved["counters"] == restored["counters"] and saved["params"].keys() == restored["params"].keys()
        same = same and all(saved["params"][n].keys() == restored["params"][n].keys() and
                            all(torch.equal(saved["params"][n][k], restored["params"][n][k]) for k in saved["params"][n])
                            for n in saved["params"])
        check(same, f"ZeRO-{stage} m3: state saved on 2 ranks restores bit-exactly on 1 rank")
        check(torch.equal(full_weights(engine)["proj.weight"], saved["params"]["proj.weight"]["fp32"]),
              f"ZeRO-{stage} m3: model weights rewritten from the fp32 masters")
        train(engine, batches[3:])
        two_ranks = torch.load(os.path.join(ckpt_root, f"zero{stage}", "final_weights_2ranks.pt"), weights_only=True)
        mine = full_weights(engine)
        check(close(mine, two_ranks),
              f"ZeRO-{stage} m3: 1-rank continuation == 2-rank continuation (max |diff| {max_diff(mine, two_ranks):.2e})")


if __name__ == "__main__":
    from train.cli import exit_without_teardown  # as the trainer's ranks exit (~1.5 s less per rank)

    count_newton_schulz_calls()
    {"main": main, "resume": resume}[sys.argv[1]](sys.argv[2])
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
    exit_without_teardown(1 if failures else 0)
