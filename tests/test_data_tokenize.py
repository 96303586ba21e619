"""Tokenizer training, tokenization into shards (local, memory://, parquet, HF datasets),
resume after an interruption, `verify`, the command line, and bad input messages."""

import json
import random

import numpy as np
import pytest

from data_pipeline import DataError, TokenLoader
from data_pipeline import tokenize as tokenize_module
from data_pipeline.cli import main as cli
from data_pipeline.shards import HEADER_SIZE, read_manifest
from data_pipeline.tokenize import TokenizeSettings, document_split, tokenize_to_shards
from data_pipeline.tokenizer import Tokenizer, train_sentencepiece
from data_pipeline.verify import check_shard_files, verify_dataset

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def class return".split()
SMALL = TokenizeSettings(shard_chars=6000, validation_fraction=0.2, workers=0)


def make_documents(n=120, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 6))]
        docs.append(f"# doc {i}\n" + "\n    ".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL file, a folder of text files, and a SentencePiece model trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_documents()
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:80])))
    (root / "texts").mkdir()
    for i, d in enumerate(docs[80:]):
        (root / "texts" / f"{i:03d}.txt").write_text(d)
    model = train_sentencepiece(docs, root / "tok.model", vocab_size=400)
    return {"root": root, "docs": docs, "jsonl": str(jsonl), "texts": str(root / "texts"), "model": str(model)}


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "ds"
    report = tokenize_to_shards([corpus["jsonl"], corpus["texts"]], corpus["model"], str(out), SMALL, progress=False)
    return out, report


def all_tokens(directory):
    fs, root, manifest = read_manifest(str(directory))
    return {s.name: np.frombuffer(fs.cat_file(f"{root}/{s.name}")[HEADER_SIZE:], np.uint16) for s in manifest.shards}


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_keeps_whitespace(corpus):
    tok = Tokenizer(corpus["model"])
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (400, 0, 2, 3)
    text = "def f(x):\n\treturn  x   # tabs, doubled spaces\n\n    é ∑ 漢字\n"
    ids = tok.encode([text])[0]
    assert tok.decode(ids) == text
    assert tok.eos_id not in ids and len(ids) < len(text.encode())


def test_huggingface_tokenizer_by_path(corpus, tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    hf.train_from_iterator(corpus["docs"], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert tok.kind == "huggingface" and tok.eos_id == 1
    report = tokenize_to_shards([corpus["jsonl"]], str(tmp_path), str(tmp_path / "ds"), SMALL, progress=False)
    assert report.manifest.tokenizer.eos_id == 1 and report.num_docs == 80
    tokens = np.concatenate(list(all_tokens(tmp_path / "ds").values()))
    assert (tokens == 1).sum() == 80  # one EOS per document


def test_bad_tokenizers(tmp_path, corpus):
    with pytest.raises(DataError, match="nope.model: tokenizer not found"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(DataError, match="--vocab-size 100: expected at least 300"):
        train_sentencepiece(corpus["docs"], tmp_path / "x.model", vocab_size=100)
    with pytest.raises(DataError, match="holds no text"):
        train_sentencepiece(["", "   "], tmp_path / "x.model", vocab_size=400)
    with pytest.raises(DataError, match="--max-bytes 0: expected a positive number of bytes"):
        train_sentencepiece(corpus["docs"], tmp_path / "x.model", vocab_size=400, max_bytes=0)


def test_an_existing_tokenizer_is_replaced_only_with_overwrite(corpus, tmp_path, capsys):
    """Manifests and exported models name their tokenizer by path and sha256: replacing it silently
    would break every dataset made with it."""
    earlier = tmp_path / "tok.model"
    earlier.write_bytes(b"an earlier tokenizer")
    with pytest.raises(DataError, match=r"tok.model: exists; choose another path or pass --overwrite"):
        train_sentencepiece(corpus["docs"], earlier, vocab_size=400)
    assert cli(["train-tokenizer", corpus["jsonl"], "--vocab-size", "350", "--out", str(earlier)]) == 2
    err = capsys.readouterr().err
    assert err == f"hope-data train-tokenizer: error: --out {earlier}: exists; choose another path or pass " \
                  "--overwrite (manifests and exported models refer to a tokenizer by path and sha256)\n"
    assert earlier.read_bytes() == b"an earlier tokenizer"
    assert cli(["train-tokenizer", corpus["jsonl"], "--vocab-size", "350", "--out", str(earlier), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint {Tokenizer(earlier).fingerprint} (replaced the tokenizer with fingerprint " \
           f"{Tokenizer.fingerprint_of(b'an earlier tokenizer')})" in out
    assert cli(["train-tokenizer", corpus["jsonl"], "--out", str(tmp_path), "--overwrite"]) == 2
    assert f"--out {tmp_path}: is a directory; expected a file path" in capsys.readouterr().err


# ------------------------------------------------------------------ tokenize
def test_shards_hold_every_document_with_eos(corpus, dataset):
    out, report = dataset
    tok = Tokenizer(corpus["model"])
    assert report.num_docs == len(corpus["docs"])
    by_split = {"train": [], "validation": []}
    for doc in corpus["docs"]:
        by_split[document_split(doc, SMALL.validation_fraction)].append(doc)
    assert by_split["validation"] and by_split["train"]
    shards = all_tokens(out)
    for split, docs in by_split.items():
        expected = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode(docs)])
        names = sorted(n for n in shards if n.startswith(split))
        assert np.array_equal(np.concatenate([shards[n] for n in names]), expected)
    assert len(shards) > 2 and report.manifest.vocab_size == 400
    assert verify_dataset(str(out)).ok


def test_worker_processes_match_in_process(corpus, dataset, tmp_path):
    parallel = TokenizeSettings(SMALL.shard_chars, SMALL.validation_fraction, workers=2, batch_chars=500)
    report = tokenize_to_shards([corpus["jsonl"], corpus["texts"]], corpus["model"], str(tmp_path / "p"), parallel,
                                progress=False)
    assert report.manifest.fingerprint == dataset[1].manifest.fingerprint


def test_memory_filesystem_round_trip(corpus, dataset, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/src/docs.jsonl", open(corpus["jsonl"], "rb").read())
    for path in sorted((corpus["root"] / "texts").iterdir()):
        fs.pipe(f"/src/texts/{path.name}", path.read_bytes())
    try:
        report = tokenize_to_shards(["memory://src/docs.jsonl", "memory://src/texts"], corpus["model"],
                                    "memory://ds", SMALL, progress=False)
        assert report.manifest.fingerprint == dataset[1].manifest.fingerprint
        assert verify_dataset("memory://ds").ok
        loaders = [TokenLoader(path, 16, 4, 0, 1, seed=1, cache_dir=tmp_path / "cache") for path in
                   ("memory://ds", str(dataset[0]))]
        for _ in range(5):
            remote, local = (next(loader) for loader in loaders)
            assert remote.equal(local)
        assert len(list((tmp_path / "cache").rglob("*.bin"))) > 0  # remote shards were cached locally
        for loader in loaders:
            loader.close()
        fs.pipe("/ds/train-00000.bin", b"HOPETOKS" + bytes(300))  # corrupt the remote copy
        with pytest.raises(DataError, match="train-00000.bin: checksum mismatch"):
            with TokenLoader("memory://ds", 16, 4, 0, 1, seed=1, cache_dir=tmp_path / "other") as loader:
                for _ in range(50):
                    next(loader)
    finally:
        fs.rm("/src", recursive=True)
        fs.rm("/ds", recursive=True)


def test_parquet_and_hf_dataset_inputs(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": corpus["docs"][:50], "n": list(range(50))}), folder / "part-0.parquet")
    direct = tokenize_to_shards([str(folder / "*.parquet")], corpus["model"], str(tmp_path / "a"), SMALL,
                                progress=False)
    via_hf = tokenize_to_shards([f"hfds:{folder}"], corpus["model"], str(tmp_path / "b"), SMALL, progress=False)
    assert direct.num_docs == via_hf.num_docs == 50
    assert direct.manifest.fingerprint == via_hf.manifest.fingerprint


def test_resume_after_interruption_keeps_finished_shards(corpus, dataset, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_write, calls = tokenize_module._write_shard, []

    def crash_on_fourth(fs, directory, name, *args):
        calls.append(name)
        if len(calls) == 4:  # die half way through writing a shard
            (out / f"{name}.tmp-dead").write_bytes(b"HOPETOKS half")
            raise KeyboardInterrupt
        return real_write(fs, directory, name, *args)

    monkeypatch.setattr(tokenize_module, "_write_shard", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        tokenize_to_shards([corpus["jsonl"], corpus["texts"]], corpus["model"], str(out), SMALL, progress=False)
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*-00000.bin")}
    monkeypatch.setattr(tokenize_module, "_write_shard", real_write)
    report = tokenize_to_shards([corpus["jsonl"], corpus["texts"]], corpus["model"], str(out), SMALL, progress=False)
    assert report.chunks_kept >= 1 and report.chunks_written >= 1
    assert report.manifest.fingerprint == dataset[1].manifest.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-00000.bin")} == kept  # not rewritten
    assert not list(out.glob("*.tmp-*")) and verify_dataset(str(out)).ok


def test_bad_inputs(corpus, tmp_path):
    model = corpus["model"]
    with pytest.raises(DataError, match="missing.txt: input not found"):
        tokenize_to_shards([str(tmp_path / "missing.txt")], model, str(tmp_path / "o1"), SMALL, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: no documents found"):
        tokenize_to_shards([str(tmp_path / "empty.txt")], model, str(tmp_path / "o2"), SMALL, progress=False)
    with pytest.raises(DataError, match=r"\*.nothing: the glob matches no file"):
        tokenize_to_shards([str(tmp_path / "*.nothing")], model, str(tmp_path / "o3"), SMALL, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2: expected a JSON object with a string field 'text'"):
        tokenize_to_shards([str(tmp_path / "bad.jsonl")], model, str(tmp_path / "o4"), SMALL, progress=False)
    (tmp_path / "ok.txt").write_text("some text")
    tokenize_to_shards([str(tmp_path / "ok.txt")], model, str(tmp_path / "o5"), SMALL, progress=False)
    other = TokenizeSettings(SMALL.shard_chars, 0.5, workers=0)
    with pytest.raises(DataError, match=r"o5: holds a tokenization made with other settings \(validation_fraction"):
        tokenize_to_shards([str(tmp_path / "ok.txt")], model, str(tmp_path / "o5"), other, progress=False)
    assert verify_dataset(str(tmp_path / "o5")).ok  # the refused rerun damaged nothing


def test_an_empty_validation_split_is_warned_about(corpus, dataset, tmp_path, capsys):
    """The split is by hash of each document alone, so a small input may get no validation document:
    `tokenize` says so (and why) instead of leaving it to the trainer to find out."""
    assert dataset[1].validation_warning is None
    few = [d for d in corpus["docs"] if document_split(d, 0.01) == "train"][:5]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in few))
    base = ["tokenize", str(tmp_path / "few.jsonl"), "--tokenizer", corpus["model"], "--workers", "0", "--quiet"]
    assert cli(base + ["--out", str(tmp_path / "a"), "--validation-fraction", "0.01"]) == 0
    captured = capsys.readouterr()
    assert "validation 0)" in captured.out
    assert captured.err == ("hope-data tokenize: warning: the validation split is empty: none of the 5 documents fell "
                            "under --validation-fraction 0.01 (each document goes to validation by a hash of its text, "
                            "about 1 in 100); hope-train needs validation data: add documents or raise "
                            "--validation-fraction\n")
    assert cli(base + ["--out", str(tmp_path / "b"), "--validation-fraction", "0"]) == 0  # none was asked for
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command, flag, value, expected", [
    ("tokenize", "--shard-mb", "0", "a positive number of millions of characters per shard"),
    ("tokenize", "--shard-mb", "-1", "a positive number of millions of characters per shard"),
    ("tokenize", "--shard-mb", "inf", "a positive number of millions of characters per shard"),
    ("tokenize", "--validation-fraction", "1", "a fraction in [0, 1)"),
    ("tokenize", "--validation-fraction", "-0.1", "a fraction in [0, 1)"),
    ("tokenize", "--validation-fraction", "nan", "a fraction in [0, 1)"),
    ("tokenize", "--workers", "-1", "a whole number >= 0 (0 = tokenize in this process)"),
    ("tokenize", "--workers", "two", "a whole number >= 0 (0 = tokenize in this process)"),
    ("train-tokenizer", "--vocab-size", "100", "a whole number >= 300"),
    ("train-tokenizer", "--max-bytes", "0", "a positive whole number of bytes"),
])
def test_command_line_refuses_nonsense_numbers(corpus, tmp_path, capsys, command, flag, value, expected):
    out = str(tmp_path / ("out.model" if command == "train-tokenizer" else "ds"))
    argv = [command, corpus["jsonl"], "--out", out, flag, value]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv + (["--tokenizer", corpus["model"]] if command == "tokenize" else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"hope-data {command}: error: argument {flag}: expected {expected}" in err and f"got '{value}'" in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_tokenize_refuses_settings_that_make_no_sense(corpus, tmp_path):
    for settings, message in ((TokenizeSettings(shard_chars=0, workers=0), "shard_chars 0: expected at least 1"),
                              (TokenizeSettings(workers=-2), "--workers -2: expected 0")):
        with pytest.raises(DataError, match=message):
            tokenize_to_shards([corpus["jsonl"]], corpus["model"], str(tmp_path / "ds"), settings, progress=False)


# ------------------------------------------------------------------ verify and the command line
def test_check_shard_files_refuses_what_the_loader_refuses(dataset, tmp_path):
    """The quick pre-run check (`hope-train --check`): header and size of every shard, tokens unread."""
    import shutil

    import fsspec

    copy = tmp_path / "copy"
    shutil.copytree(dataset[0], copy)
    check_shard_files(*read_manifest(str(copy)))  # a whole dataset passes
    names = sorted(p.name for p in copy.glob("train-*.bin"))
    (copy / names[0]).write_bytes((copy / names[0]).read_bytes()[:-2])
    with pytest.raises(DataError, match=f"{names[0]}: truncated shard, \\d+ bytes, the manifest expects \\d+$"):
        check_shard_files(*read_manifest(str(copy)))
    with pytest.raises(DataError, match=f"{names[0]}: truncated shard"):  # the run itself refuses it too
        TokenLoader(str(copy), 16, 4, 0, 1, seed=0)
    header = bytearray((copy / names[1]).read_bytes())
    header[24] ^= 1  # the token count, same file size
    (copy / names[1]).write_bytes(bytes(header))
    (copy / names[2]).unlink()
    with pytest.raises(DataError, match=r"truncated shard.* \(and 2 more damaged shards: `hope-data verify .*copy` "):
        check_shard_files(*read_manifest(str(copy)))
    (copy / names[0]).unlink()
    shutil.copy(dataset[0] / names[0], copy / names[0])
    with pytest.raises(DataError, match=f"{names[1]}: header says .* tokens"):
        check_shard_files(*read_manifest(str(copy)))
    # a remote dataset: sizes from one listing (its checksums are checked when the loader copies a shard)
    fs = fsspec.filesystem("memory")
    try:
        for path in dataset[0].iterdir():
            if path.is_file():
                fs.pipe(f"/checked/{path.name}", path.read_bytes())
        check_shard_files(*read_manifest("memory://checked"))
        fs.pipe(f"/checked/{names[3]}", (dataset[0] / names[3]).read_bytes()[:100])
        with pytest.raises(DataError, match=f"{names[3]}: truncated shard, 100 bytes"):
            check_shard_files(*read_manifest("memory://checked"))
    finally:
        fs.rm("/checked", recursive=True)


def test_verify_reports_each_damaged_shard(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset[0], copy)
    names = sorted(p.name for p in copy.glob("train-*.bin"))
    flipped = bytearray((copy / names[0]).read_bytes())
    flipped[-1] ^= 0xFF
    (copy / names[0]).write_bytes(bytes(flipped))
    (copy / names[1]).write_bytes((copy / names[1]).read_bytes()[:-2])
    report = verify_dataset(str(copy / "manifest.json"))
    assert report.checked == len(dataset[1].manifest.shards) and len(report.problems) == 2
    assert f"{names[0]}: checksum mismatch" in report.problems[0]
    assert f"{names[1]}: truncated shard" in report.problems[1]


def test_command_line(corpus, tmp_path, capsys):
    model = str(tmp_path / "cli.model")
    assert cli(["train-tokenizer", corpus["jsonl"], "--vocab-size", "350", "--out", model]) == 0
    assert "vocabulary 350, pad=0 bos=2 eos=3" in capsys.readouterr().out
    out = str(tmp_path / "ds")
    assert cli(["tokenize", corpus["jsonl"], corpus["texts"], "--tokenizer", model, "--out", out,
                "--workers", "0", "--quiet"]) == 0
    assert "120 documents" in capsys.readouterr().out
    assert cli(["verify", out]) == 0
    assert ": OK" in capsys.readouterr().out
    shard = sorted((tmp_path / "ds").glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:HEADER_SIZE + 4])
    assert cli(["verify", out]) == 1
    assert "truncated shard" in capsys.readouterr().out
    assert cli(["tokenize", str(tmp_path / "none.jsonl"), "--tokenizer", model, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hope-data tokenize: error: ") and "none.jsonl: input not found" in err
    assert "Traceback" not in err
    assert cli(["verify", str(tmp_path)]) == 2
    assert "no manifest.json found" in capsys.readouterr().err
