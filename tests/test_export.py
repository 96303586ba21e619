"""Hugging Face export (issue 7): ZeRO 1/2/3 checkpoints of 2 ranks -> folders that a fresh Python,
without this project importable, loads through AutoModelForCausalLM(trust_remote_code=True) with the
training model's logits (fp32, 1e-5) and greedy output; generate() with the recurrent cache.

This file is also the torchrun worker that writes the checkpoints (run as a script).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STAGES = (1, 2, 3)
TOKENIZER_TEXT = ["def add(a, b):\n    return a + b  # sum 12\n", "class Point:\n\tx = 1.5\n    y = 'two'\n"] * 40


def tiny_config(mixer: str = "titans"):
    from hope import HopeConfig

    return HopeConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, mixer=mixer, chunk_size=4,
                      projection_chunk_size=4, cms_hidden_sizes=[48, 48], cms_periods=[0, 64],
                      max_position_embeddings=128).validate()


def run_config(cache_dir: Path) -> dict:
    return {"data": {"path": "default", "cache_dir": str(cache_dir), "vocab_size": 320, "seq_len": 16},
            "train": {"max_steps": 1}}


def write_run_metadata(step_dir: Path, model_config, run_cfg: dict, step: int, data_state: dict | None = None) -> None:
    import yaml

    (step_dir / "model_config.json").write_text(json.dumps(model_config.to_dict()))
    (step_dir / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    state = {"step": step, "tokens_seen": 64 * step, "world_size": 2}
    if data_state:
        state["data_state"] = data_state
    (step_dir / "trainer_state.json").write_text(json.dumps(state))


# ---------------------------------------------------------------- worker (under torchrun)
def worker(out: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    from hope import HopeForCausalLM
    from train.distributed import start_process_group

    start_process_group("gloo")
    rank = dist.get_rank()
    for stage in STAGES:
        torch.manual_seed(0)
        model = HopeForCausalLM(tiny_config())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": stage}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        torch.manual_seed(100 + rank)  # different data per rank
        ids = torch.randint(4, 320, (2, 12))
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        run = out / f"zero{stage}"
        engine.save_checkpoint(str(run / "checkpoints"), tag="step-00000001")
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            if rank == 0:  # the training model's weights, for the comparison
                weights = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
                torch.save(weights, run / "training_weights.pt")
        if rank == 0:
            write_run_metadata(run / "checkpoints" / "step-00000001", tiny_config(), run_config(out / "cache"), 1)
            (run / "checkpoints" / "latest").write_text("step-00000001")
        dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread avoids oversubscribing a busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """2-rank ZeRO 1, 2 and 3 checkpoints (one torchrun) plus the run's SentencePiece tokenizer."""
    from data_pipeline.corpus import corpus_root
    from data_pipeline.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("export_runs")
    tokenizer = corpus_root(out / "cache", 320, 6_000_000) / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True)
    train_sentencepiece(TOKENIZER_TEXT, tokenizer, vocab_size=320, threads=1)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


@pytest.fixture(scope="module")
def exported(runs) -> dict[int, Path]:
    from train.export import export_checkpoint

    folders = {}
    for stage in STAGES:
        folders[stage], warnings = export_checkpoint(runs / f"zero{stage}", runs / f"hf-zero{stage}", dtype="fp32")
        assert warnings == []
    return folders


def training_model(runs: Path, stage: int, mixer: str = "titans"):
    from hope import HopeForCausalLM

    model = HopeForCausalLM(tiny_config(mixer)).eval()
    model.load_state_dict(torch.load(runs / f"zero{stage}" / "training_weights.pt"))
    return model


# A fresh interpreter: no site (so the editable install's finder is not loaded), site-packages added
# by hand, cwd outside the checkout, a fresh transformers module cache.
FRESH_SCRIPT = textwrap.dedent("""
    import json, sys
    try:
        import hope
        sys.exit("hope is importable in the fresh interpreter")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folders, ids_path, out_path = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    ids = torch.load(ids_path)
    results = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        results[folder] = {"logits": logits, "greedy": greedy, "class": type(model).__module__,
                           "tokens": tok("x = 1  # hi")["input_ids"]}
    torch.save(results, out_path)
""")


def run_fresh(folders: list[Path], ids: torch.Tensor, tmp: Path) -> dict:
    script, ids_path, out_path = tmp / "fresh.py", tmp / "ids.pt", tmp / "out.pt"
    script.write_text(FRESH_SCRIPT)
    torch.save(ids, ids_path)
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": os.environ.get("PATH", ""), "HF_MODULES_CACHE": str(tmp / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HOME": str(tmp)}
    cmd = [sys.executable, "-I", "-S", "-c",
           f"import sys; sys.path.append({site!r}); sys.argv = sys.argv[:1] + sys.argv[1:]; "
           f"exec(open({str(script)!r}).read())", ",".join(map(str, folders)), str(ids_path), str(out_path)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path, weights_only=False)


# ---------------------------------------------------------------- tests
def test_zero_checkpoints_of_2_ranks_consolidate_to_the_training_weights(runs, exported):
    from safetensors.torch import load_file

    for stage in STAGES:
        reference = torch.load(runs / f"zero{stage}" / "training_weights.pt")
        saved = load_file(exported[stage] / "model.safetensors")
        for name, tensor in saved.items():
            assert torch.equal(tensor, reference[name]), (stage, name)
        assert set(reference) - set(saved) <= {"lm_head.weight"}  # tied to the embedding
        files = {p.name for p in exported[stage].iterdir()}
        assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "modeling_hope.py"} <= files
        assert not any("optim" in name or name.endswith(".pt") for name in files)


def test_remote_code_in_fresh_interpreter_matches_training_model(runs, exported, tmp_path):
    import sentencepiece as spm

    from data_pipeline.corpus import corpus_root
    from train.export import export_checkpoint

    sentencepiece = spm.SentencePieceProcessor(model_file=str(corpus_root(runs / "cache", 320, 6_000_000) / "tokenizer.model"))

    # Transformer++ exports the same way: a stage-0 style checkpoint (one full model file).
    torch.manual_seed(3)
    from hope import HopeForCausalLM

    baseline = HopeForCausalLM(tiny_config("attention")).eval()
    step_dir = tmp_path / "tpp" / "checkpoints" / "step-00000005"
    step_dir.mkdir(parents=True)
    torch.save({"module": baseline.state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    write_run_metadata(step_dir, tiny_config("attention"), run_config(runs / "cache"), 5)
    tpp_folder, _ = export_checkpoint(step_dir, tmp_path / "hf-tpp", dtype="fp32")

    ids = torch.randint(4, 320, (2, 11))
    results = run_fresh([exported[1], exported[3], tpp_folder], ids, tmp_path)
    for folder, model in ((exported[1], training_model(runs, 1)), (exported[3], training_model(runs, 3)),
                          (tpp_folder, baseline)):
        got = results[str(folder)]
        assert got["class"].startswith("transformers_modules")  # the folder's own code, not this project
        with torch.no_grad():
            want = model(ids).logits
        assert (got["logits"] - want).abs().max().item() < 1e-5
        assert torch.equal(got["greedy"], model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
        assert got["tokens"] == sentencepiece.encode("x = 1  # hi")


def test_installed_package_auto_classes_know_hope_without_remote_code(exported):
    import hope  # noqa: F401 - registers the Auto classes
    from transformers import AutoConfig, AutoModelForCausalLM

    from hope import HopeForCausalLM

    config = AutoConfig.for_model("hope")
    assert type(config).__module__ == "hope.config"
    model = AutoModelForCausalLM.from_pretrained(exported[2], trust_remote_code=False)
    assert type(model) is HopeForCausalLM


@pytest.mark.parametrize("mixer", ["titans", "attention"])
def test_generate_with_cache_equals_without(mixer):
    from hope import HopeForCausalLM

    torch.manual_seed(0)
    model = HopeForCausalLM(tiny_config(mixer)).eval()
    ids = torch.randint(4, 320, (2, 9))
    fed, body = [], model.model.forward  # the tokens each forward gets: the prompt, then one at a time
    model.model.forward = lambda input_ids, cache=None: fed.append(input_ids.shape[1]) or body(input_ids, cache)
    greedy = model.generate(ids, max_new_tokens=7, do_sample=False)
    assert greedy.shape == (2, 16) and fed == [9] + [1] * 6, fed
    assert torch.equal(greedy, model.generate(ids, max_new_tokens=7, do_sample=False, use_cache=False))
    beams = model.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False)
    assert torch.equal(beams, model.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False, use_cache=False))
    torch.manual_seed(5)
    sampled = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20)
    torch.manual_seed(5)
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20, use_cache=False))


def test_bf16_export_and_sharding(runs, tmp_path):
    from train.export import export_checkpoint

    folder, _ = export_checkpoint(runs / "zero2", tmp_path / "hf-bf16", dtype="bf16", max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    reference = training_model(runs, 2)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight.bfloat16())


def test_export_during_training_writes_step_folder_and_latest(runs):
    from train.export import export_during_training

    run_dir = runs / "zero1"
    state = torch.get_rng_state()
    process = export_during_training(run_dir, run_dir / "checkpoints" / "step-00000001", 1, dtype="fp32")
    assert process.wait(timeout=120) == 0, (run_dir / "hf" / "export.log").read_text()[-3000:]
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's RNG is not touched
    assert (run_dir / "hf" / "latest").read_text() == "step-00000001"
    assert (run_dir / "hf" / "step-00000001" / "model.safetensors").is_file()
    card = (run_dir / "hf" / "step-00000001" / "README.md").read_text()
    assert "| optimizer steps | 1 |" in card and "| tokens seen | 64 |" in card
    assert not list((run_dir / "hf").glob(".*tmp*"))


# ---------------------------------------------------------------- a project as hope-train leaves it (no torchrun)
def make_project(root: Path) -> Path:
    """ROOT as after `hope-train CONFIG --run-dir runs/r` was run in ROOT: the default corpus's tokenizer
    and shards under .cache/hope-data (the manifest names the tokenizer by a path relative to ROOT and
    records its sha256), and a one-file (stage 0) checkpoint of runs/r whose trainer_state.json records
    the dataset's absolute path, as the loader does. Returns the run directory."""
    from data_pipeline.corpus import corpus_root
    from data_pipeline.tokenize import TokenizeSettings, tokenize_to_shards
    from data_pipeline.tokenizer import train_sentencepiece
    from hope import HopeForCausalLM

    corpus = corpus_root(".cache/hope-data", 320)  # relative, as configs/train/*.yaml give data.cache_dir
    (root / corpus).mkdir(parents=True)
    train_sentencepiece(TOKENIZER_TEXT, root / corpus / "tokenizer.model", vocab_size=320, threads=1)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TOKENIZER_TEXT))
    before = os.getcwd()
    os.chdir(root)  # hope-train prepares the corpus in its working directory
    try:
        tokenize_to_shards(["docs.jsonl"], str(corpus / "tokenizer.model"), str(corpus / "shards"),
                           TokenizeSettings(validation_fraction=0.1, workers=0), progress=False)
    finally:
        os.chdir(before)
    run = root / "runs" / "r"
    step_dir = run / "checkpoints" / "step-00000002"
    step_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = HopeForCausalLM(tiny_config("attention"))
    torch.save({"module": model.state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    run_cfg = {"data": {"path": "default", "cache_dir": ".cache/hope-data", "vocab_size": 320, "seq_len": 16}}
    reads = [{"dataset": str((root / corpus / "shards").resolve()), "manifest": "-", "reads": 4}]
    write_run_metadata(step_dir, tiny_config("attention"), run_cfg, 2, {"reads": reads})
    (run / "checkpoints" / "latest").write_text("step-00000002")
    return run


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ROOT with its content: to see that a refused export touched nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(argv: list, capsys) -> tuple[int, str]:
    """hope-export ARGV: (exit status, stderr)."""
    from train.export import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def test_output_dir_holding_anything_but_a_previous_export_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import train.export_source

    run = make_project(tmp_path / "project")
    checkpoint = run / "checkpoints" / "step-00000002"
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me too")
    before = tree(tmp_path)

    def no_work(*args):
        raise AssertionError("the weights were read before OUTPUT_DIR was checked")

    monkeypatch.setattr(train.export_source, "consolidated_state_dict", no_work)
    for source, out, why in [(run, run.parent, "contains"), (run, tmp_path, "contains"),
                             (run, run, "is the very directory"), (run, run / "hf-out", "is inside"),
                             (checkpoint, checkpoint / "out", "is inside"), (checkpoint, run / "export", "is inside"),
                             (run, tmp_path / "a-file", "is not a directory"),
                             (run, tmp_path / "notes", "neither empty nor a hope-export folder")]:
        code, err = cli([source, out], capsys)
        assert code == 2 and err.startswith(f"hope-export: {out}: ") and why in err and "\n" not in err, (out, err)
        assert tree(tmp_path) == before, out  # nothing moved, replaced or deleted
    monkeypatch.undo()

    # a new path, an empty directory, and a previous export (replaced whole) are written
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "hf", tmp_path / "empty", tmp_path / "empty"):
        code, err = cli([run, out, "--dtype", "fp32"], capsys)
        assert code == 0, err
        assert (out / "model.safetensors").is_file()
        assert json.loads((out / "training_state.json").read_text())["step"] == 2
    leftovers = [p for p in [*tmp_path.iterdir(), *(tmp_path / "new").iterdir()] if p.name.startswith(".")]
    assert not leftovers  # no temporary or old folders

    # the trainer's periodic export goes inside the run (RUN_DIR/hf) and replaces its own previous one
    from train.export import export_step

    for _ in range(2):
        export_step(run, checkpoint, 2, dtype="fp32")
    assert (run / "hf" / "step-00000002" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "hf").iterdir()) == ["latest", "step-00000002"]


def test_tokenizer_changed_after_tokenizing_is_refused(tmp_path, capsys, monkeypatch):
    import hashlib

    import train.export

    from data_pipeline.tokenizer import train_sentencepiece

    run = make_project(tmp_path / "project")
    manifest_path = next((tmp_path / "project" / ".cache").rglob("manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    tokenizer = tmp_path / "project" / manifest["tokenizer"]["path"]
    train_sentencepiece(TOKENIZER_TEXT, tmp_path / "other.model", vocab_size=300, threads=1)  # a smaller vocabulary
    tokenizer.write_bytes((tmp_path / "other.model").read_bytes())  # overwritten after the data was tokenized
    actual = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:16]
    with monkeypatch.context() as patch:  # refused before the weights are read (minutes for a 1.3B model)
        patch.setattr(train.export, "load_model", lambda info: pytest.fail("weights read before the check"))
        code, err = cli([run, tmp_path / "out"], capsys)
    assert code == 2 and "\n" not in err, err
    assert err == (f"hope-export: {tokenizer}: sha256 {actual}, but {manifest_path} records "
                   f"{manifest['tokenizer']['fingerprint']}: the tokenizer changed after the data was tokenized; "
                   "restore the original file")
    assert not (tmp_path / "out").exists()

    # a manifest without a digest: nothing to check against, the file found is exported as before
    del manifest["tokenizer"]["fingerprint"]
    manifest_path.write_text(json.dumps(manifest))
    code, err = cli([run, tmp_path / "out"], capsys)
    assert code == 0 and "warning" not in err, err
    assert len(json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]) == 300


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def alter_a_byte(path: Path) -> None:
    """Flip a byte inside the largest entry of a torch file: same size, zip index intact, a silent
    change of a weight for torch.load."""
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _set_json(name: str, **fields):
    def change(step_dir: Path) -> None:
        path = step_dir / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return change


@pytest.mark.parametrize("file, damage, says", [
    ("mp_rank_00_model_states.pt", lambda d: _truncate(d / "mp_rank_00_model_states.pt"), "not a complete torch file"),
    ("mp_rank_00_model_states.pt", lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b""), "empty file"),
    ("mp_rank_00_model_states.pt", lambda d: alter_a_byte(d / "mp_rank_00_model_states.pt"),
     "altered since it was saved (its entry "),
    ("mp_rank_00_model_states.pt", lambda d: torch.save({"step": 2}, d / "mp_rank_00_model_states.pt"),
     "KeyError: 'module'"),
    ("trainer_state.json", lambda d: (d / "trainer_state.json").write_text('{"step": 2,'), "not readable JSON"),
    ("trainer_state.json", lambda d: (d / "trainer_state.json").write_text("[2]"), "expected a JSON object, got list"),
    ("trainer_state.json", _set_json("trainer_state.json", step="two"), "step is 'two', expected an integer >= 0"),
    ("model_config.json", lambda d: (d / "model_config.json").write_text('{"hidden_'), "not readable JSON"),
    ("model_config.json", _set_json("model_config.json", hidden_size="wide"), "not a valid model configuration"),
    ("model_config.json", _set_json("model_config.json", num_heads=3), "model.num_heads: must divide hidden_size=32"),
    ("model_config.json", _set_json("model_config.json", num_heads=0), "num_heads: expected a positive integer, got 0"),
    ("config.yaml", lambda d: (d / "config.yaml").write_text("data: [\n"), "not readable YAML"),
])
def test_corrupt_checkpoint_file_is_one_line_naming_it(tmp_path, capsys, file, damage, says):
    run = make_project(tmp_path / "project")
    step_dir = run / "checkpoints" / "step-00000002"
    damage(step_dir)
    code, err = cli([run, tmp_path / "out"], capsys)
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"hope-export: {step_dir / file}") and says in err, err
    assert not (tmp_path / "out").exists()


def test_missing_or_truncated_zero_shard_is_one_line_naming_it(runs, tmp_path, capsys):
    import shutil

    cases = [("zero2", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "unlink",
              "missing (expected one such file for each of ranks 0-1)"),
             ("zero2", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate", "not a complete torch file"),
             ("zero3", "zero_pp_rank_1_mp_rank_00_model_states.pt", "unlink", "missing")]
    cases.append(("zero2", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "unlink", "missing"))
    for stage, name, how, says in cases:
        run = tmp_path / f"{stage}-{how}-{name[:4]}"
        shutil.copytree(runs / stage, run)
        if name.startswith("bf16_"):  # bf16 runs name their ZeRO files so
            for file in (run / "checkpoints" / "step-00000001").glob("zero_pp_rank_*"):
                file.rename(file.with_name("bf16_" + file.name))
        path = run / "checkpoints" / "step-00000001" / name
        path.unlink() if how == "unlink" else _truncate(path)
        code, err = cli([run, tmp_path / f"out-{stage}-{how}-{name[:4]}"], capsys)
        assert code == 2 and "\n" not in err and err.startswith(f"hope-export: {path}: {says}"), err


def test_model_config_that_does_not_fit_the_weights_is_one_line(tmp_path, capsys):
    run = make_project(tmp_path / "project")
    config = run / "checkpoints" / "step-00000002" / "model_config.json"
    original = config.read_text()
    for fields, says in [({"hidden_size": 64}, "model.embed_tokens.weight is [320, 32] in the checkpoint, [320, 64] by "
                                               "the config"),
                         ({"num_layers": 3}, "missing ['model.layers.2."),
                         ({"num_layers": 1}, "unexpected ['model.layers.1.")]:
        config.write_text(json.dumps({**json.loads(original), **fields}))
        code, err = cli([run, tmp_path / "out"], capsys)
        assert code == 2 and "\n" not in err, err
        assert err.startswith(f"hope-export: {config} does not fit the checkpoint's weights: ") and says in err, err


@pytest.mark.parametrize("size", ["lots", "500", "0GB", "5XB", "-1MB"])
def test_bad_max_shard_size_is_an_argument_error(tmp_path, capsys, size):
    from train.export import build_parser, main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "run"), str(tmp_path / "out"), f"--max-shard-size={size}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"hope-export: error: argument --max-shard-size: {size!r}: expected a "
                                            "positive size with a unit, such as 500MB or 5GB (units KB, MB, GB, TB)")
    assert build_parser().parse_args(["r", "o", "--max-shard-size", "2.5MB"]).max_shard_size == 2_500_000


def test_export_from_another_directory_finds_the_tokenizer(tmp_path, monkeypatch):
    import shutil

    import sentencepiece as spm

    from train.export import export_checkpoint

    run = make_project(tmp_path / "project")
    tokenizer = next((tmp_path / "project" / ".cache").rglob("tokenizer.model"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the run's config says data.cache_dir: .cache/hope-data

    def exported_tokens(run: Path, out: Path) -> list[int]:
        from transformers import AutoTokenizer

        folder, warnings = export_checkpoint(run, out, dtype="fp32")
        assert warnings == []
        return AutoTokenizer.from_pretrained(folder)("x = 1  # hi")["input_ids"]

    want = spm.SentencePieceProcessor(model_file=str(tokenizer)).encode("x = 1  # hi")
    # the run directory inside the project it was trained in: the project is one of its parents
    state_path = run / "checkpoints" / "step-00000002" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "data_state": {}}))  # here without the loader's record
    assert exported_tokens(run, tmp_path / "out-1") == want
    # the run moved out of the project: trainer_state.json's loader state names the dataset's absolute path
    state_path.write_text(json.dumps(state))
    (tmp_path / "scratch").mkdir()
    shutil.move(run, tmp_path / "scratch" / "r")
    assert exported_tokens(tmp_path / "scratch" / "r", tmp_path / "out-2") == want


if __name__ == "__main__":
    from train.cli import exit_without_teardown  # as the trainer's ranks exit (~1.5 s less per rank)

    worker(Path(sys.argv[1]))
    exit_without_teardown(0)
