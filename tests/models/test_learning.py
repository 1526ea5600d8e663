"""Each arch's debug size learns a small next-token task on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zarvan_dist import ARCHS, ModelConfig, build_model

CONFIGS = Path(__file__).parents[2] / "configs" / "models"
VOCAB = 64


def markov_batch(perm: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Rows that follow x[t+1] = perm[x[t]] from random starts: predictable from context."""
    rows = [torch.randint(0, VOCAB, (batch,), generator=gen)]
    for _ in range(length - 1):
        rows.append(perm[rows[-1]])
    return torch.stack(rows, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_debug_size_learns_next_token_task(arch):
    data = ModelConfig.from_yaml(CONFIGS / f"{arch}-debug.yaml").to_dict()
    data["vocab_size"] = VOCAB
    if data.get("cutoffs"):
        data["cutoffs"] = [8, 24]
    model = build_model(ModelConfig.from_dict(data))
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(VOCAB, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        ids = markov_batch(perm, 8, 33, gen)
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert start > 3.5  # about ln(64): the model starts ignorant
    assert end < 0.25 * start, f"{arch}: loss {start:.3f} -> {end:.3f}"
