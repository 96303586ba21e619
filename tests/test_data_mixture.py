"""Mixtures of datasets: the pattern's shares, each dataset read once per its own epoch, resume.

Two synthetic datasets with disjoint token ids (tests/test_data_loader.py's format): a sample's
first token says which dataset it came from and which of its samples it is.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_loader import SEQ, VOCAB, take, write_dataset

from data_pipeline import DataError, TokenLoader
from data_pipeline.mixture import MixturePattern

BIG, SMALL = (1000, 600), (300, 101)  # train tokens per shard: 200 and 50 samples of 8 tokens
SECOND = 1 << 19  # the second dataset's first token id


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return {str(write_dataset(root / "big", train_sizes=BIG)): 0.75,
            str(write_dataset(root / "small", train_sizes=SMALL, first_id=SECOND)): 0.25}


def stream(mixture, n, world_size=1, batch=8, state=None, **kwargs):
    """n global batches as one [n * batch, SEQ + 1] array, and the final state."""
    loaders = [TokenLoader(mixture, SEQ, batch, r, world_size, seed=4, **kwargs) for r in range(world_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    parts = [torch.cat(take(loader, n)).numpy().reshape(n, batch // world_size, SEQ + 1) for loader in loaders]
    final = loaders[0].state_dict()
    for loader in loaders:
        loader.close()
    return np.concatenate(parts, axis=1).reshape(n * batch, SEQ + 1), final


@pytest.mark.parametrize("weights", [[1], [3, 1], [0.5, 0.3, 0.2], [1, 1, 1], [0.9999, 0.0001], [2, 7, 1, 5]])
def test_pattern_keeps_the_shares_in_every_window(weights):
    pattern = MixturePattern(weights)
    assert pattern.counts.sum() == pattern.period
    assert np.allclose(pattern.fractions, np.array(weights) / sum(weights), atol=1 / pattern.period)
    positions = np.arange(3 * pattern.period + 17)
    which, reads = pattern.locate(positions)
    for s, n in enumerate(pattern.counts):  # each dataset's reads are 0, 1, 2, ... in stream order
        assert np.array_equal(reads[which == s], np.arange((which == s).sum()))
        for window in (8, 64, 1000):  # any window of consecutive positions holds window * share +- 2
            in_window = np.convolve(which == s, np.ones(window), "valid")
            assert np.abs(in_window - window * n / pattern.period).max() < 2
    for p in (0, 1, 5000, pattern.period, 2 * pattern.period + 123, len(positions)):
        assert np.array_equal(pattern.reads_before(p), np.bincount(which[:p], minlength=len(weights)))
    if len(weights) == 1:  # one dataset: position p is its read p, the stream of a loader without mixture
        assert np.array_equal(reads, positions)


@pytest.mark.parametrize("weights, message", [
    ([], "at least one dataset"), ([1, 0], "weight 0: expected a positive number"),
    ([1, -2], "weight -2"), ([1, float("nan")], "weight nan"),
    ([1, 1e-6], r"weight 1e-06 \(dataset 1\) is below 1/10000 of the total"),
])
def test_bad_weights_are_refused_by_value(weights, message):
    with pytest.raises(DataError, match=message):
        MixturePattern(weights)


def test_each_dataset_is_read_once_per_its_own_epoch_at_its_share(mixture):
    rows, state = stream(mixture, 50, world_size=2)  # 400 samples: 300 of big (1.5 epochs), 100 of small (2)
    assert all(np.array_equal(r, np.arange(r[0], r[0] + SEQ + 1)) for r in rows), "a sample is not contiguous"
    from_small = rows[:, 0] >= SECOND
    assert from_small.sum() == 100
    assert all(1 <= from_small[i:i + 8].sum() <= 3 for i in range(0, 400, 8))  # every batch: 2 +- 1 of 8
    big, small = rows[~from_small, 0], rows[from_small, 0]
    for firsts, num_samples in ((big, 200), (small, 50)):  # no sample twice within one of its epochs
        for epoch in (firsts[:num_samples], firsts[num_samples:2 * num_samples]):
            assert len(np.unique(epoch)) == len(epoch)
    assert np.array_equal(np.sort(small[50:]), np.sort(small[:50])) and not np.array_equal(small[50:], small[:50])
    with TokenLoader(mixture, SEQ, 8, 0, 1, seed=4) as loader:
        loader.load_state_dict(state)
        assert loader.epochs == [1, 2] and state["epoch"] == 2 and state["samples_consumed"] == 400
        assert loader.num_samples == 250 and loader.vocab_size == VOCAB


@pytest.mark.parametrize("resume_world_size", [1, 4])
def test_resume_on_another_world_size_continues_the_mixture(mixture, resume_world_size):
    reference, _ = stream(mixture, 20, world_size=2)
    first, state = stream(mixture, 7, world_size=2, num_workers=0)
    rest, _ = stream(mixture, 13, world_size=resume_world_size, state=json.loads(json.dumps(state)))
    assert np.array_equal(reference, np.concatenate([first, rest]))


def test_weights_and_tokenizers_are_part_of_the_mixture(tmp_path, mixture):
    big, small = mixture
    _, state = stream(mixture, 2)
    _, alone = stream({big: 1}, 2)
    with TokenLoader(big, SEQ, 8, 0, 1, seed=4) as loader:  # a mixture of one is the dataset itself
        assert alone["fingerprint"] == loader.fingerprint != state["fingerprint"]
    reweighted = {big: 0.5, small: 0.5}
    with TokenLoader(reweighted, SEQ, 8, 0, 1, seed=4) as loader:
        with pytest.raises(DataError, match=r"big, .*small: the manifest or the mixture changed since the checkpoint"):
            loader.load_state_dict(state)
        loader.load_state_dict(state, allow_changed_manifest=True)  # the position is kept
        assert loader.state_dict()["samples_consumed"] == 16
    other = write_dataset(tmp_path / "other-tokenizer", train_sizes=SMALL, tokenizer_sha="e" * 16)
    with pytest.raises(DataError, match=r"other-tokenizer: tokenized with synthetic \(sha256 eeee.*a mixture's datasets "
                                        "need one tokenizer"):
        TokenLoader({big: 1, str(other): 1}, SEQ, 8, 0, 1, seed=4)


@pytest.mark.parametrize("resume_world_size", [1, 2])
def test_new_weights_continue_every_dataset_at_its_next_read(mixture, resume_world_size):
    """3:1 for 80 samples, then 1:1 (allowed): each dataset's reads go on where they were, so each
    reads its own stream in order, no sample twice or skipped across the change; and a resume after
    the change continues the new pattern where it was."""
    big, small = mixture
    reweighted = {big: 0.5, small: 0.5}
    before, state = stream(mixture, 10)
    loader = TokenLoader(reweighted, SEQ, 8, 0, 1, seed=4)
    loader.load_state_dict(json.loads(json.dumps(state)), allow_changed_manifest=True)
    after = torch.cat(take(loader, 20)).numpy()
    changed = loader.state_dict()
    loader.close()
    rows = np.concatenate([before, after])
    from_small = rows[:, 0] >= SECOND
    assert from_small[:80].sum() == 20 and from_small[80:].sum() == 80
    alone_big, _ = stream({big: 1}, 140 // 4, batch=4)  # each dataset by itself: its own stream
    alone_small, _ = stream({small: 1}, 100 // 4, batch=4)
    assert np.array_equal(rows[~from_small], alone_big) and np.array_equal(rows[from_small], alone_small)
    assert changed["phase_start"] == 80 and [e["reads"] for e in changed["reads"]] == [140, 100]
    # resumed again on the new weights (on another world size too): the new pattern where it was
    with TokenLoader(reweighted, SEQ, 8, 0, 1, seed=4) as loader:
        loader.load_state_dict(json.loads(json.dumps(state)), allow_changed_manifest=True)
        take(loader, 5)
        middle = loader.state_dict()
    later, _ = stream(reweighted, 15, world_size=resume_world_size, state=json.loads(json.dumps(middle)))
    assert np.array_equal(later, after[40:])


def test_a_dataset_that_leaves_the_mixture_keeps_its_reads(mixture):
    big, small = mixture
    _, state = stream(mixture, 10)  # big read 60 times, small 20
    with TokenLoader(big, SEQ, 8, 0, 1, seed=4) as loader:  # small leaves
        loader.load_state_dict(state, allow_changed_manifest=True)
        take(loader, 5)
        alone = loader.state_dict()
    assert [(e["dataset"], e["reads"]) for e in alone["reads"] + alone["left"]] == [(big, 100), (small, 20)]
    with TokenLoader(mixture, SEQ, 8, 0, 1, seed=4) as loader:  # and comes back at its read 20
        loader.load_state_dict(alone, allow_changed_manifest=True)
        rows = torch.cat(take(loader, 4)).numpy()
    alone_small, _ = stream({small: 1}, 7, batch=4)
    assert np.array_equal(rows[rows[:, 0] >= SECOND], alone_small[20:28])


def test_changed_data_finds_each_dataset_by_path_then_manifest_then_one_for_one(tmp_path, mixture, monkeypatch):
    import shutil

    big, small = mixture
    _, state = stream(mixture, 10)  # big read 60 times, small 20
    moved = tmp_path / "moved-small"
    shutil.copytree(small, moved)  # the same data elsewhere: found by its manifest
    monkeypatch.chdir(Path(big).parent.parent)
    relative = f"{Path(big).parent.name}/big/manifest.json"  # big spelled another way: found by its path
    with TokenLoader({relative: 0.5, str(moved) + "/": 0.5}, SEQ, 8, 0, 1, seed=4) as loader:
        loader.load_state_dict(state, allow_changed_manifest=True)
        assert [e["reads"] for e in loader.state_dict()["reads"]] == [60, 20]
        assert loader.data_change == f"data changed, each dataset goes on: {relative} at read 60, {moved}/ at read 20"
    grown = write_dataset(tmp_path / "grown", train_sizes=BIG + (800,))  # shards added, and a new path
    _, alone = stream({big: 1}, 10)
    with TokenLoader(str(grown), SEQ, 8, 0, 1, seed=4) as loader:  # one dataset replacing one: goes on
        loader.load_state_dict(alone, allow_changed_manifest=True)
        assert loader.state_dict()["reads"][0]["reads"] == 80 and loader.epochs == [0]
    with TokenLoader({str(grown): 0.5, small: 0.5}, SEQ, 8, 0, 1, seed=4) as loader:  # unknown in a mixture: new
        loader.load_state_dict(state, allow_changed_manifest=True)
        assert loader.data_change.endswith(f"{grown} at read 0 (new), {small} at read 20")
        assert [e["reads"] for e in loader.state_dict()["left"]] == [60]  # big's reads are kept


def test_a_state_from_before_the_reads_were_kept_resumes_as_it_did(mixture):
    big, small = mixture
    reference, _ = stream(mixture, 20)
    _, state = stream(mixture, 8)
    old = {key: state[key] for key in ("seed", "epoch", "samples_consumed", "fingerprint")}
    rest, _ = stream(mixture, 12, state=old)
    assert np.array_equal(rest, reference[64:])  # the same mixture: exact
    with TokenLoader({big: 0.5, small: 0.5}, SEQ, 8, 0, 1, seed=4) as loader:
        loader.load_state_dict(old, allow_changed_manifest=True)
        assert loader.data_change == "data changed: the position carries over" and loader.state_dict()["phase_start"] == 0


def test_changed_data_matches_every_path_before_any_manifest(tmp_path, mixture):
    import shutil

    big, small = mixture
    _, state = stream(mixture, 10)
    copy = tmp_path / "copy-of-small"
    shutil.copytree(small, copy)
    with TokenLoader({str(copy): 1, small: 1}, SEQ, 8, 0, 1, seed=4) as loader:
        loader.load_state_dict(state, allow_changed_manifest=True)  # small by its path, the copy is new
        assert loader.data_change.endswith(f"{copy} at read 0 (new), {small} at read 20")
        assert loader.planned_epochs(0) == [0.0, 20 / 50]  # before the change: the reads so far


@pytest.mark.parametrize("change, message", [
    ({"phase_start": 999}, r"phase_start 999, expected an int in \[0, samples_consumed\]"),
    ({"reads": [["x", -1]]}, r"reads \[\['x', -1\]\], expected a list of \{'dataset': path"),
    ({"left": [{"dataset": "x", "manifest": "y", "reads": -1}]}, "left .*expected a list"),
    ({"reads": [{"dataset": "a", "manifest": "m", "reads": 0}] * 2}, "do not fit samples_consumed 80"),
    ({"reads": [{"dataset": "a", "manifest": "m", "reads": 0}]}, "do not fit samples_consumed 80"),
    ({"reads": [{"dataset": "a", "manifest": "m", "reads": 2**63}] * 2}, "expected a list of"),
    ({"samples_consumed": True}, "samples_consumed True, expected an int >= 0"),
    ({"phase_start": -1}, "phase_start -1"),
])
def test_a_state_whose_reads_do_not_fit_is_refused(mixture, change, message):
    _, state = stream(mixture, 10)
    with TokenLoader(mixture, SEQ, 8, 0, 1, seed=4) as loader:
        with pytest.raises(DataError, match=message):
            loader.load_state_dict({**state, **change})
        with pytest.raises(DataError, match="loader state: NoneType, expected a mapping"):
            loader.load_state_dict(None)


def test_validation_mixes_the_validation_splits_alike(mixture):
    with TokenLoader(mixture, SEQ, 8, 0, 1, seed=4, split="validation") as loader:
        rows = torch.cat(take(loader, 4)).numpy()
    from_small = rows[:, 0] >= SECOND
    assert from_small.sum() == 8  # a quarter
    assert (rows[~from_small, 0] >= sum(BIG)).all() and (rows[from_small, 0] >= SECOND + sum(SMALL)).all()


def test_dataset_labels_are_the_shortest_path_ends_that_tell_datasets_apart():
    from data_pipeline.mixture import dataset_labels

    assert dataset_labels(["/data/fineweb-edu", "/data/long-docs/"]) == ["fineweb-edu", "long-docs"]
    assert dataset_labels(["/a/v1/web", "/b/v1/web", "s3://bucket/code"]) == ["a/v1/web", "b/v1/web", "code"]
    assert dataset_labels(["/a/x", "/a/x/"]) == ["/a/x", "/a/x/"]  # one directory spelled two ways
