"""TokenLoader: exactly-once coverage per epoch, resume (also on another world size), bad state.

The dataset here is synthetic and written with the real shard format: token i of the train split
has id i, so every token is unique and coverage can be checked exactly. Shards have uneven sizes,
so samples cross shard boundaries.
"""

import hashlib
import json

import numpy as np
import pytest
import torch

from data_pipeline import DataError, TokenLoader
from data_pipeline.order import EpochPermutation
from data_pipeline.shards import Manifest, ShardInfo, TokenizerInfo, encode_shard

SEQ = 7  # samples of 8 tokens
VOCAB = 1 << 20  # ids up to 1M: uint32 shards
TRAIN_SHARDS = (1000, 37, 1, 555)  # 1593 tokens -> 199 samples, 1 token left over
VALID_SHARDS = (300,)


def write_dataset(directory, train_sizes=TRAIN_SHARDS, valid_sizes=VALID_SHARDS, vocab=VOCAB, first_id=0,
                  tokenizer_sha="f" * 16):
    """Token i of the train split has id first_id + i; the validation split's ids follow."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = TokenizerInfo("sentencepiece", "synthetic", tokenizer_sha, vocab, None, 0, None)
    shards, next_id = [], first_id
    for split, sizes in (("train", train_sizes), ("validation", valid_sizes)):
        for k, size in enumerate(sizes):
            tokens = np.arange(next_id, next_id + size) % vocab
            next_id += size
            data = encode_shard(tokens, vocab, num_docs=1)
            name = f"{split}-{k:05d}.bin"
            (directory / name).write_bytes(data)
            shards.append(ShardInfo(name, split, size, 1, len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(tok, 0.1, shards)
    (directory / "manifest.json").write_text(manifest.to_json())
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def global_batches(data_dir, world_size, n, batch=12, seed=5, state=None, **kwargs):
    """n global batches, the per-rank slices of each concatenated in rank order."""
    loaders = [TokenLoader(data_dir, SEQ, batch, r, world_size, seed, **kwargs) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    per_rank = [take(loader, n) for loader in loaders]
    out = [torch.cat(parts) for parts in zip(*per_rank, strict=True)]
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    assert all(s == states[0] for s in states), "ranks disagree on the loader state"
    return out, states[0]


def test_permutation_is_a_bijection_and_depends_on_seed_and_epoch():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        order = EpochPermutation(n, seed=1, epoch=0)(np.arange(n))
        assert sorted(order.tolist()) == list(range(n))
    n = 1000
    a, b, c = (EpochPermutation(n, s, e)(np.arange(n)) for s, e in ((1, 0), (1, 1), (2, 0)))
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9
    assert not np.array_equal(a, np.arange(n))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_token_once_per_epoch(data_dir, world_size):
    batch = 12  # divisible by 1, 2, 3 and 4
    loaders = [TokenLoader(data_dir, SEQ, batch, r, world_size, seed=3, num_workers=r % 2) for r in range(world_size)]
    num_samples = loaders[0].num_samples
    assert num_samples == sum(TRAIN_SHARDS) // (SEQ + 1)
    steps = num_samples // batch * 2 + 3  # two full epochs and a bit
    seen = np.concatenate([torch.cat(take(loader, steps)).numpy() for loader in loaders])
    per_rank_rows = steps * batch // world_size
    # rebuild the global stream order: rank slices interleave batch by batch
    local = batch // world_size
    rows = seen.reshape(world_size, steps, local, SEQ + 1).transpose(1, 0, 2, 3).reshape(-1, SEQ + 1)
    assert rows.shape[0] == world_size * per_rank_rows
    usable = num_samples * (SEQ + 1)
    epoch0, epoch1 = rows[:num_samples], rows[num_samples:2 * num_samples]
    for epoch in (epoch0, epoch1):
        assert np.array_equal(np.sort(epoch.ravel()), np.arange(usable)), "a token repeated or skipped"
        assert all(np.array_equal(r, np.arange(r[0], r[0] + SEQ + 1)) for r in epoch), "a sample is not contiguous"
    assert not np.array_equal(epoch0, epoch1), "epoch 1 reused epoch 0's order"
    assert loaders[0].state_dict()["epoch"] == 2
    for loader in loaders:
        loader.close()


def test_world_size_does_not_change_the_global_stream(data_dir):
    one, _ = global_batches(data_dir, 1, 6)
    for world_size in (2, 3, 4):
        many, _ = global_batches(data_dir, world_size, 6)
        assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))


@pytest.mark.parametrize("resume_world_size", [2, 3])
def test_resume_mid_epoch_equals_uninterrupted(data_dir, resume_world_size):
    reference, _ = global_batches(data_dir, 2, 30)  # 30 * 12 samples crosses into epoch 1
    first, state = global_batches(data_dir, 2, 7)
    assert state["samples_consumed"] == 7 * 12 and state["epoch"] == 0
    state = json.loads(json.dumps(state))  # checkpoints store it as plain data
    rest, final = global_batches(data_dir, resume_world_size, 23, state=state)
    assert all(torch.equal(a, b) for a, b in zip(reference, first + rest, strict=True))
    assert final["epoch"] == 30 * 12 // (sum(TRAIN_SHARDS) // (SEQ + 1))


def test_background_workers_give_the_same_batches(data_dir):
    sync, _ = global_batches(data_dir, 2, 10, num_workers=0)
    threaded, _ = global_batches(data_dir, 2, 10, num_workers=3, prefetch=5)
    assert all(torch.equal(a, b) for a, b in zip(sync, threaded, strict=True))


def test_batch_shape_dtype_and_seed(data_dir):
    with TokenLoader(data_dir, SEQ, 8, 1, 4, seed=0) as loader:
        batch = next(loader)
        assert batch.shape == (2, SEQ + 1) and batch.dtype == torch.long
        assert loader.vocab_size == VOCAB and len(loader.fingerprint) == 16
    a, _ = global_batches(data_dir, 1, 3, seed=0)
    b, _ = global_batches(data_dir, 1, 3, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_validation_is_deterministic_and_resets(data_dir):
    with TokenLoader(data_dir, SEQ, 4, 0, 1, seed=9, split="validation") as loader:
        first = take(loader, 3)
        loader.reset()
        again = take(loader, 3)
    with TokenLoader(data_dir, SEQ, 4, 0, 1, seed=9, split="validation") as fresh:
        fresh_batches = take(fresh, 3)
    for a, b, c in zip(first, again, fresh_batches, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    tokens = torch.cat(first).flatten()
    assert tokens.min() >= sum(TRAIN_SHARDS), "validation batches hold train tokens"


def test_changed_manifest_is_refused_unless_allowed(tmp_path, data_dir):
    with TokenLoader(data_dir, SEQ, 4, 0, 1, seed=0) as loader:
        take(loader, 2)
        state = loader.state_dict()
    changed = write_dataset(tmp_path / "changed", train_sizes=(900, 700))
    with TokenLoader(changed, SEQ, 4, 0, 1, seed=0) as loader:
        with pytest.raises(DataError, match=r"manifest changed since the checkpoint.*allow_changed_manifest"):
            loader.load_state_dict(state)
        loader.load_state_dict(state, allow_changed_manifest=True)
        assert loader.state_dict()["samples_consumed"] == 8
        next(loader)


def test_bad_state_and_arguments(data_dir):
    with TokenLoader(data_dir, SEQ, 4, 0, 1, seed=0) as loader:
        state = loader.state_dict()
        with pytest.raises(DataError, match="seed 0 in the checkpoint, but this loader has seed 1"):
            with TokenLoader(data_dir, SEQ, 4, 0, 1, seed=1) as other:
                other.load_state_dict(state)
        with pytest.raises(DataError, match="missing key 'samples_consumed'"):
            loader.load_state_dict({"seed": 0, "epoch": 0, "fingerprint": state["fingerprint"]})
    with pytest.raises(DataError, match="global_batch_size=6: expected a positive multiple of world_size=4"):
        TokenLoader(data_dir, SEQ, 6, 0, 4, seed=0)
    with pytest.raises(DataError, match="rank=2: expected 0 <= rank < world_size=2"):
        TokenLoader(data_dir, SEQ, 4, 2, 2, seed=0)
    with pytest.raises(DataError, match="split='test'"):
        TokenLoader(data_dir, SEQ, 4, 0, 1, seed=0, split="test")
    with pytest.raises(DataError, match="split 'validation' has 300 tokens, fewer than one sample"):
        TokenLoader(data_dir, 400, 4, 0, 1, seed=0, split="validation")


def test_vocabulary_larger_than_the_model_is_refused(data_dir):
    with pytest.raises(DataError, match=f"tokenizer vocabulary is {VOCAB}.*larger than the model's vocab_size 4096"):
        TokenLoader(data_dir, SEQ, 4, 0, 1, seed=0, expected_vocab_size=4096)
    TokenLoader(data_dir, SEQ, 4, 0, 1, seed=0, expected_vocab_size=VOCAB, num_workers=0).close()


def test_missing_truncated_and_foreign_shards(tmp_path):
    broken = write_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="no manifest.json found"):
        TokenLoader(tmp_path / "nowhere", SEQ, 4, 0, 1, seed=0)
    shard = broken / "train-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-00003.bin: truncated shard, \d+ bytes, the manifest expects \d+"):
        TokenLoader(broken, SEQ, 4, 0, 1, seed=0)
    shard.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="train-00003.bin: not a hope-data shard"):
        TokenLoader(broken, SEQ, 4, 0, 1, seed=0)
    shard.unlink()
    with pytest.raises(DataError, match="train-00003.bin: shard listed in the manifest is missing"):
        TokenLoader(broken, SEQ, 4, 0, 1, seed=0)
    manifest = broken / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"num_tokens": 1000,', '"num_tokens": 999,', 1))
    with pytest.raises(DataError, match="manifest.json: manifest was edited"):
        TokenLoader(broken, SEQ, 4, 0, 1, seed=0)
    manifest.write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: unreadable manifest"):
        TokenLoader(broken, SEQ, 4, 0, 1, seed=0)


@pytest.mark.parametrize("vocab, dtype",
                         [(4096, np.uint16), (65536, np.uint16), (65537, np.uint32), (1 << 20, np.uint32)])
def test_shard_header_round_trip(vocab, dtype):
    from data_pipeline.shards import HEADER_SIZE, decode_header

    tokens = np.array([0, 1, vocab - 1], dtype=np.int64)
    data = encode_shard(tokens, vocab, num_docs=2)
    header = decode_header(data, "x.bin")
    assert (header.dtype, header.vocab_size, header.num_tokens, header.num_docs) == (dtype, vocab, 3, 2)
    assert header.file_size == len(data) and data[:8] == b"HOPETOKS"
    assert np.array_equal(np.frombuffer(data[HEADER_SIZE:], dtype), tokens)
    with pytest.raises(DataError, match="x.bin: truncated shard, 10 bytes is shorter than the 64-byte header"):
        decode_header(data[:10], "x.bin")
