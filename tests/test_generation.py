"""Sampling with the state carried equals re-reading the whole sequence at every token."""

from __future__ import annotations

import pytest
import torch

from zarvan_dist import build_model
from zarvan_dist.generation import generate


@pytest.mark.parametrize("arch", ["zarvan", "nonattn", "transformer", "slam"])
def test_greedy_streaming_equals_full_recompute(arch, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch)).eval()
    prompt = torch.randint(4, model.config.vocab_size, (2, 9))
    prompt[:, 0] = 1
    new = generate(model, prompt, 12, temperature=0, bos_id=1)
    assert new.shape == (2, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            logits = model(seq, None, seq == 1).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, prompt.shape[1]:])


def test_sampling_is_seeded_and_top_k_restricts(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config("zarvan")).eval()
    prompt = torch.randint(4, model.config.vocab_size, (1, 5))
    a = generate(model, prompt, 20, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 20, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with torch.no_grad():
        first = model(prompt).logits[0, -1]
    assert int(a[0, 0]) in torch.topk(first, 3).indices.tolist()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, prompt[:, :0], 3)
