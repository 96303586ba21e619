"""The embedded default corpus: built once, safe under concurrent callers, loadable."""

import subprocess
import sys

import pytest

from data_pipeline import TokenLoader, prepare_default_corpus
from data_pipeline.corpus import stdlib_files
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.verify import verify_dataset

MAX_BYTES = 1_500_000
BUILD = ("import sys; from data_pipeline import prepare_default_corpus; "
         "p = prepare_default_corpus(sys.argv[1], vocab_size=1024, max_bytes={}); print(p.data_dir)").format(MAX_BYTES)


@pytest.fixture(scope="module")
def built_concurrently(tmp_path_factory):
    """Two processes race to build the same corpus (as two ranks would)."""
    cache = tmp_path_factory.mktemp("cache")
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    return cache, [out.strip() for out, _ in outputs]


def test_concurrent_builds_agree_and_the_result_is_whole(built_concurrently):
    cache, dirs = built_concurrently
    assert dirs[0] == dirs[1]
    report = verify_dataset(dirs[0])
    assert report.ok and report.checked >= 2
    assert report.manifest.vocab_size == 1024
    assert not list(cache.rglob("*.tmp-*"))


def test_second_call_reuses_the_build(built_concurrently):
    cache, dirs = built_concurrently
    manifest = next(cache.rglob("manifest.json"))
    before = manifest.stat().st_mtime_ns
    prepared = prepare_default_corpus(cache, vocab_size=1024, max_bytes=MAX_BYTES)
    assert str(prepared.data_dir) == dirs[0] and manifest.stat().st_mtime_ns == before


def test_default_corpus_is_python_source(built_concurrently):
    cache, _ = built_concurrently
    prepared = prepare_default_corpus(cache, vocab_size=1024, max_bytes=MAX_BYTES)
    tok = Tokenizer(prepared.tokenizer_path)
    files = stdlib_files(MAX_BYTES)
    assert files == sorted(files) and sum(f.stat().st_size for f in files) <= MAX_BYTES
    with TokenLoader(prepared.data_dir, 128, 4, 0, 1, seed=0) as train, \
            TokenLoader(prepared.data_dir, 128, 4, 0, 1, seed=0, split="validation") as validation:
        assert train.vocab_size == 1024
        assert 0.01 < validation.num_samples / (train.num_samples + validation.num_samples) < 0.15  # ~5% nominal
        text = "".join(tok.decode(row.tolist()) for row in next(train))
    assert text.count("\n") > 10 and any(word in text for word in ("def ", "import ", "return", "self"))


def test_a_builder_waits_for_the_lock_holder(tmp_path):
    """While another process holds the build lock, prepare_default_corpus waits instead of building."""
    import fcntl
    import time

    from data_pipeline.corpus import corpus_root

    small = 300_000
    root = corpus_root(tmp_path, 512, small)
    root.mkdir(parents=True)
    script = BUILD.replace("vocab_size=1024", "vocab_size=512").replace(str(MAX_BYTES), str(small))
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        time.sleep(4)  # long enough to import and (without the lock) build this small corpus
        assert proc.poll() is None and not (root / "corpus.jsonl").exists()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and verify_dataset(out.strip()).ok
