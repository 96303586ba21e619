"""Train a small HOPE on a repetitive token corpus and compare its loss with the unigram entropy.

    python tools/learn_repetitive.py --steps 200 --set inner_momentum=false

A model that learns in context ends far below the unigram entropy (the loss of a model that only
counts tokens). Used to pick stable defaults for the inner learning rate (docs/DESIGN_CHOICES.md)
and, in a smaller form, by tests/test_hope_learning.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hope import HopeConfig, HopeForCausalLM  # noqa: E402


def repetitive_corpus(vocab: int, phrase_len: int, repeats: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (phrase_len,), generator=g).repeat(repeats)


def unigram_entropy(tokens: torch.Tensor) -> float:
    p = torch.bincount(tokens).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def train(overrides: dict, steps: int, device: str = "cpu", seq: int = 64, batch: int = 8, lr: float = 3e-3,
          seed: int = 0, log_every: int = 0) -> dict:
    torch.manual_seed(seed)
    fields = dict(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, chunk_size=16,
                  projection_chunk_size=16, cms_hidden_sizes=[128, 128], cms_periods=[0, 0])
    fields.update(overrides)
    model = HopeForCausalLM(HopeConfig(**fields).validate()).to(device)
    corpus = repetitive_corpus(fields["vocab_size"], 24, 400)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses, start = [], time.time()
    for step in range(steps):
        idx = torch.randint(0, len(corpus) - seq - 1, (batch,), generator=g)
        sample = torch.stack([corpus[i:i + seq + 1] for i in idx]).to(device)
        loss = model(sample[:, :-1], labels=sample[:, 1:], shift_labels=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"  step {step:4d} loss {losses[-1]:.4f}", flush=True)
        if not math.isfinite(losses[-1]):
            break
    return {"overrides": overrides, "steps": len(losses), "first": losses[0], "last": losses[-1],
            "min": min(losses), "unigram_entropy": unigram_entropy(corpus), "seconds": time.time() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sweep", type=str, default=None, help="JSON list of override dicts to run in turn")
    args = parser.parse_args(argv)
    runs = json.loads(args.sweep) if args.sweep else [{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}]
    for overrides in runs:
        r = train(overrides, args.steps, args.device)
        print(f"{json.dumps(r['overrides']):70s} steps {r['steps']:4d} first {r['first']:.3f} last {r['last']:.3f} "
              f"min {r['min']:.3f} (unigram entropy {r['unigram_entropy']:.3f}) {r['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
