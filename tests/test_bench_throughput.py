"""tools/bench_throughput.py --quick: a real DeepSpeed ZeRO-2 run of tiny HOPE and Transformer++ on CPU.

One subprocess (~10 s here; the first DeepSpeed run on a fresh machine also builds DeepSpeed's
shared-memory comm op once, ~40 s, cached under ~/.cache/torch_extensions).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench_throughput.py"
RATIO_LINE = re.compile(r"^ratio HOPE/Transformer\+\+: (\d+\.\d\d)$")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_throughput") / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(SCRIPT), "--quick", "--profile", "--memory-limit-gib", "78.5", "--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    return proc, out


@pytest.mark.timeout(180)
def test_quick_prints_both_models_and_the_ratio_line(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert any(line.startswith("device: CPU") and "deepspeed" in line for line in lines), proc.stdout
    assert any(line.startswith("command: python tools/bench_throughput.py --quick") for line in lines)
    for name in ("HOPE", "Transformer++"):
        assert any(line.split()[:1] == [name] and "tokens/s" in line and re.search(r"MFU +n/a", line)
                   for line in lines), \
            f"no result line for {name}:\n{proc.stdout}"
    # --profile: under each result line its profiled step, the heaviest ops first (on CUDA: kernels)
    profiles = [i for i, line in enumerate(lines) if line.startswith("    CPU ops (the heaviest):")]
    assert [lines[i - 1].split()[0] for i in profiles] == ["HOPE", "Transformer++"], proc.stdout
    assert any("aten::" in line for line in lines[profiles[0] + 1:profiles[1]]), proc.stdout
    assert "memory limit: --memory-limit-gib applies to CUDA only, ignored on CPU" in lines
    match = RATIO_LINE.match(lines[-1])
    assert match, f"last line is not the ratio line: {lines[-1]!r}"
    assert float(match.group(1)) > 0


@pytest.mark.timeout(180)
def test_quick_writes_the_json_report(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for key in ("device", "torch", "deepspeed", "date", "command", "dtype", "optimizer", "results", "pairs", "ratio"):
        assert key in report, key
    assert report["dtype"] == "fp32" and report["zero_stage"] == 2
    assert [r["model"] for r in report["results"]] == ["HOPE", "Transformer++"]
    for r in report["results"]:
        assert r["status"] == "ok" and r["size"] == "tiny" and r["seq"] == 128
        assert r["params"] > 0 and r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["flops_per_token"] > 0
        # CPU: no peak FLOP/s, no CUDA allocator
        assert r["mfu"] is None and r["peak_mem_gib"] is None and r["peak_reserved_gib"] is None
        assert len(r["step_ms"]) == report["steps"]
        assert 0 < r["loss"] < 20  # a real loss of a freshly initialised model (ln 4096 = 8.3)
        kernels = r["profile"]["kernels"]
        assert r["profile"]["gpu"] is False and r["profile"]["ms"] > 0 and 0 < len(kernels) <= 25
        assert [k[2] for k in kernels] == sorted((k[2] for k in kernels), reverse=True)  # heaviest first
    assert report["memory_limit_gib"] is None  # the cap is CUDA's allocator's
    hope, transformer = report["results"]
    assert report["pairs"] == [{"size": "tiny", "seq": 128, "micro_batch": hope["micro_batch"],
                                "ratio": pytest.approx(hope["tokens_per_s"] / transformer["tokens_per_s"])}]
    assert report["ratio"] == pytest.approx(report["pairs"][0]["ratio"])
    printed = RATIO_LINE.match(proc.stdout.strip().splitlines()[-1]).group(1)
    assert printed == f"{report['ratio']:.2f}"


def test_oom_is_reported_and_hope_oom_counts_as_zero(monkeypatch):
    bench = load_bench()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "measure", out_of_memory)
    args = bench.parse_args(["--quick"])
    config = bench.model_configs("tiny", args, torch.device("cpu"))["HOPE"]
    result = bench.run_model("HOPE", config, "tiny", 128, 2, args, torch.device("cpu"))
    assert result["status"] == "OOM" and result["model"] == "HOPE"
    assert bench.format_result(result).split() == ["HOPE", "OOM"]
    ok = {"status": "ok", "tokens_per_s": 100.0}
    assert bench.pair_ratio({"status": "OOM"}, ok) == (0.0, "0.00 (HOPE OOM, counted as 0.00)")
    assert bench.pair_ratio(ok, {"status": "OOM"})[0] is None
    assert bench.pair_ratio({"status": "ok", "tokens_per_s": 70.0}, ok)[0] == pytest.approx(0.7)


def test_memory_limit_must_be_a_positive_size(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--memory-limit-gib", "0"])
    assert "--memory-limit-gib 0.0: expected a size in GiB above 0" in capsys.readouterr().err
    assert bench.limit_memory(78.5, torch.device("cpu"))[0] is None


def test_a_failed_profile_is_reported_under_the_figures():
    bench = load_bench()
    result = {"status": "ok", "model": "HOPE", "params": 2e6, "tokens_per_s": 100.0, "ms_per_step": 10.0,
              "mfu": None, "peak_mem_gib": None, "loss": 7.5, "checkpointing": False, "compiled": False,
              "profile": {"ms": 0.0, "gpu": True, "kernels": [], "error": "RuntimeError: CUPTI_ERROR"}}
    lines = bench.format_result(result).splitlines()
    assert "100 tokens/s" in lines[0] and lines[1] == "    profile failed: RuntimeError: CUPTI_ERROR"
    assert len(bench.format_result({**result, "profile": None}).splitlines()) == 1
