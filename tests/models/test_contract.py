"""The causal-model contract, checked for every arch through the public interface.

model(input_ids, state, doc_start) -> (logits, state): streaming over chunks equals one pass,
no logit reads the future, a document start resets the row.
"""

from __future__ import annotations

import random

import pytest
import torch

from zarvan_dist import ARCHS, RecurrentState, build_model
from numerics import rel_err, random_splits, run_chunked

STREAMING = [a for a in ARCHS if a != "slam"]  # slam carries no state across windows (its docstring)


@pytest.mark.parametrize("arch", STREAMING)
def test_streaming_equals_full_forward(arch, tiny_config):
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 61, (3, 41))
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[1, 17] = doc_start[2, 0] = doc_start[2, 30] = True
    full = model(ids, doc_start=doc_start)
    chunked, state = run_chunked(model, ids, doc_start, random_splits(41, random.Random(arch)), detach=True)
    assert rel_err(chunked, full.logits) <= 1e-5
    for name in full.state.keys():
        assert torch.allclose(state[name].float(), full.state[name].float(), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("arch", STREAMING)
def test_streaming_gradients_match_with_attached_state(arch, tiny_config):
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 61, (2, 23))
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    weights = torch.randn(2, 23, 61)

    def grads(logits):
        model.zero_grad()
        (logits * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full = grads(model(ids, doc_start=doc_start).logits)
    chunked = grads(run_chunked(model, ids, doc_start, random_splits(23, random.Random(1)), detach=False)[0])
    assert full.keys() == chunked.keys() and full
    for name in full:
        assert rel_err(chunked[name], full[name]) <= 1e-4, name


@pytest.mark.parametrize("arch", ARCHS)
def test_no_logit_reads_the_future(arch, tiny_config):
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 61, (2, 29))
    base = model(ids).logits
    for t in (0, 7, 16, 28):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 61
        logits = model(changed).logits
        assert torch.equal(logits[:, :t], base[:, :t]), f"position < {t} changed"
        assert not torch.equal(logits[:, t:], base[:, t:]), "the changed token has no effect"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_logit_reads_a_future_document_start(arch, tiny_config):
    """Where a later document starts is content too: it must not reach earlier logits."""
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 61, (2, 29))
    base = model(ids, doc_start=torch.zeros_like(ids, dtype=torch.bool)).logits
    for t in (5, 16, 28):
        doc_start = torch.zeros_like(ids, dtype=torch.bool)
        doc_start[:, t] = True
        logits = model(ids, doc_start=doc_start).logits
        assert torch.equal(logits[:, :t], base[:, :t]), f"a document start at {t} changed earlier logits"


@pytest.mark.parametrize("arch", ARCHS)
def test_document_start_resets_the_row(arch, tiny_config):
    model = build_model(tiny_config(arch)).eval()
    doc_a, doc_b = torch.randint(0, 61, (1, 13)), torch.randint(0, 61, (1, 19))
    both = torch.cat([doc_a, doc_b], 1)
    doc_start = torch.zeros_like(both, dtype=torch.bool)
    doc_start[0, 13] = True
    together = model(both, doc_start=doc_start).logits[:, 13:]
    alone = model(doc_b, model.init_state(1)).logits
    assert rel_err(together, alone) <= 1e-5


@pytest.mark.parametrize("arch", STREAMING)
def test_document_start_resets_a_carried_state(arch, tiny_config):
    """A reset at the first token of a window drops the state carried from the last window."""
    model = build_model(tiny_config(arch)).eval()
    doc_a, doc_b = torch.randint(0, 61, (1, 11)), torch.randint(0, 61, (1, 9))
    carried = model(doc_a).state
    start = torch.zeros_like(doc_b, dtype=torch.bool)
    start[0, 0] = True
    assert rel_err(model(doc_b, carried, start).logits, model(doc_b).logits) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_state_rows_select_write_and_round_trip(arch, tiny_config):
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 61, (4, 10))
    state = model(ids).state
    flat = state.to_dict()
    assert all(t.shape[0] == 4 for t in flat.values())
    again = RecurrentState.from_dict({k: v.clone() for k, v in flat.items()})
    rows = again.select(torch.tensor([2, 0]))
    fresh = model.init_state(4)
    fresh.write_(torch.tensor([1, 3]), rows)
    for k in flat:
        assert torch.equal(fresh[k][1], flat[k][2]) and torch.equal(fresh[k][3], flat[k][0])
    # row 2's state continues row 2 alone
    more = torch.randint(0, 61, (4, 5))
    batched = model(more, state).logits[2:3]
    single = model(more[2:3], state.select(slice(2, 3))).logits
    assert rel_err(single, batched) <= 1e-5
