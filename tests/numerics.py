"""Helpers the model and op tests share: relative error and chunked (streaming) runs."""

from __future__ import annotations

import random

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 (b is the reference)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def random_splits(total: int, rng: random.Random) -> list[int]:
    """Chunk sizes summing to ``total``: 1-token steps and chunks of up to 13 tokens."""
    sizes = [1, 1]
    while sum(sizes) < total:
        sizes.append(rng.choice([1, 2, 3, 5, 7, 9, 13]))
    sizes[-1] -= sum(sizes) - total
    sizes = [s for s in sizes if s > 0]
    rng.shuffle(sizes)
    return sizes


def run_chunked(model, ids: torch.Tensor, doc_start: torch.Tensor, sizes: list[int], detach: bool):
    """Run ``model`` over ``ids`` [B, T] in chunks of ``sizes`` with the state carried.

    Returns the concatenated logits [B, T, V] and the final state; checks on the way that the
    state keeps the same names and shapes (a checkpoint stores it with a fixed layout).
    """
    state, outs, start = model.init_state(ids.shape[0]), [], 0
    shapes = {k: v.shape for k, v in state.items()}
    for size in sizes:
        out = model(ids[:, start:start + size], state, doc_start[:, start:start + size])
        assert {k: v.shape for k, v in out.state.items()} == shapes, "the state changed its layout"
        outs.append(out.logits)
        state = out.state.detach() if detach else out.state
        start += size
    return torch.cat(outs, 1), state
