"""The chunked two-stage scan (ops/chunked.py) and the ops' chunked forms against loops and the naive forms."""

from __future__ import annotations

import pytest
import torch

from zarvan_dist.ops import EMPTY_MAX, chunked, prefix_softmax_pool, prefix_sum
from zarvan_dist.ops import prefix_softmax as pool_module
from zarvan_dist.ops.naive import naive_prefix_softmax_pool
from numerics import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 and groups of 4, so that short windows take every stage and the recursion."""
    monkeypatch.setattr(chunked, "CHUNK", 8)
    monkeypatch.setattr(chunked, "GROUP", 4)


@pytest.fixture
def chunked_calls(monkeypatch):
    """Records, per pool call, whether the chunked form ran (True) or handed over to the scan (False)."""
    calls = []
    forward = pool_module._chunked_forward

    def spy(*args):
        result = forward(*args)
        calls.append(result is not None)
        return result
    monkeypatch.setattr(pool_module, "_chunked_forward", spy)
    return calls


def documents(batch, length, rate, generator=None):
    reset = torch.rand(batch, length, generator=generator) < rate
    return reset, reset.long().cumsum(1)


def decayed_loop(values, levels, doc, reverse):
    """float64: h_i = sum over j <= i (>= i if reverse) in i's document of exp(-|level_i - level_j|) v_j."""
    v, lv = values.double(), levels.double()
    out = torch.zeros_like(v)
    for i in range(v.shape[1]):
        for j in range(v.shape[1]):
            if (j <= i) != reverse or j == i:
                same = (doc[:, i] == doc[:, j]).view(-1, 1, 1).double()
                gap = (lv[:, j] - lv[:, i]) if not reverse else (lv[:, i] - lv[:, j])
                out[:, i] += same * torch.exp(gap) * v[:, j]
    return out


def running_levels(batch, length, channels, doc, spread):
    """Levels that never fall inside a document: a running max of random scores, restarted per document."""
    raw = (torch.rand(batch, length, 1, channels) - 0.5) * spread
    out = raw.clone()
    for t in range(1, length):
        same = (doc[:, t] == doc[:, t - 1]).view(-1, 1, 1)
        out[:, t] = torch.where(same, torch.maximum(out[:, t - 1], raw[:, t]), raw[:, t])
    return out


@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("length", [1, 4, 5, 17, 40])
@pytest.mark.parametrize("reverse", [False, True])
def test_decayed_sums_match_a_loop_with_groups_and_recursion(small_chunks, channels, length, reverse):
    torch.manual_seed(length + channels)
    _, doc = documents(2, length, 0.15)
    levels = running_levels(2, length, channels, doc, spread=300.0)  # far apart: only exact decays survive
    values = torch.randn(2, length, 3, 5)
    out = chunked.decayed_sums(values, levels, doc, reverse=reverse)
    assert out.shape == values.shape and torch.isfinite(out).all()
    assert rel_err(out, decayed_loop(values, levels, doc, reverse)) <= 1e-6


def test_running_max_by_document_is_exact():
    values = torch.tensor([[[3.0], [-0.0], [float("-inf")], [-7.5], [1e30], [-2.0], [0.0], [5.0]]])
    doc = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    initial = torch.tensor([[4.0]])
    out = chunked.running_max_by_document(values, doc, initial)
    expected = torch.tensor([[[4.0], [4.0], [float("-inf")], [-7.5], [1e30], [-2.0], [0.0], [5.0]]])
    assert torch.equal(out, expected)
    torch.manual_seed(0)
    values = torch.randn(3, 50, 4) * 100
    _, doc = documents(3, 50, 0.1)
    out = chunked.running_max_by_document(values, doc, torch.full((3, 4), EMPTY_MAX))
    running = torch.full((3, 4), EMPTY_MAX)
    for t in range(50):
        if t:
            running = torch.where((doc[:, t] == doc[:, t - 1])[:, None], running, torch.full_like(running, EMPTY_MAX))
        running = torch.maximum(running, values[:, t])
        assert torch.equal(out[:, t], running)


def test_chunk_mask_feeds_earlier_positions_of_the_same_document():
    doc = torch.tensor([[0, 0, 1, 1]])
    assert torch.equal(chunked.chunk_mask(doc)[0], torch.tensor(
        [[1.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]))


def pool_inputs(batch, length, width, score_dim, spread, device="cpu"):
    scores = (torch.rand(batch, length, score_dim, device=device) - 0.5) * spread
    values = torch.randn(batch, length, width, device=device)
    reset = torch.rand(batch, length, device=device) < 0.05
    reset[0, :3] = True  # a reset at the first token, and one-token documents
    reset[-1, 8:length:8] = True  # documents that start on chunk edges (chunks of 8)
    initial = (torch.randn(batch, score_dim, device=device) * spread / 4, torch.randn(batch, width, device=device),
               torch.rand(batch, score_dim, device=device) + 0.5)
    return scores, values, initial, reset


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_dim", [1, 6])
@pytest.mark.parametrize("length", [9, 64, 150])
@pytest.mark.parametrize("with_reset", [True, False])
def test_chunked_pool_matches_naive_outputs_states_and_every_gradient(small_chunks, chunked_calls, device,
                                                                     score_dim, length, with_reset):
    torch.manual_seed(length + score_dim)
    scores, values, initial, reset = pool_inputs(3, length, 6, score_dim, spread=20.0, device=device)
    reset = reset if with_reset else None
    inputs = [scores.requires_grad_(), values.requires_grad_(), initial[1].requires_grad_(), initial[2].requires_grad_()]
    out, (m, n, d) = prefix_softmax_pool(scores, values, initial, reset)
    assert chunked_calls == [True]
    ref, (rm, rn, rd) = naive_prefix_softmax_pool(scores, values, initial, reset)
    assert rel_err(out, ref) <= 1e-5 and torch.equal(m, rm)
    assert rel_err(n, rn) <= 1e-5 and rel_err(d, rd) <= 1e-5
    assert all(t.is_contiguous() for t in (m, n, d))  # a carried state keeps one layout
    w_out, w_n, w_d = torch.randn_like(out), torch.randn_like(n), torch.randn_like(d)
    loss = (out * w_out).sum() + (n * w_n).sum() + (d * w_d).sum()
    ref_loss = (ref * w_out).sum() + (rn * w_n).sum() + (rd * w_d).sum()
    for g, r in zip(torch.autograd.grad(loss, inputs, retain_graph=True),
                    torch.autograd.grad(ref_loss, inputs, retain_graph=True)):
        assert rel_err(g, r) <= 1e-5
    # the output alone (the final state's gradient absent), as training uses it: backward runs twice
    grads = torch.autograd.grad((out * w_out).sum(), inputs[:2])
    for g, r in zip(grads, torch.autograd.grad((ref * w_out).sum(), inputs[:2])):
        assert rel_err(g, r) <= 1e-5


@pytest.mark.parametrize("score_dim", [1, 8])
def test_chunked_pool_under_bfloat16_autocast_matches_naive(small_chunks, chunked_calls, score_dim):
    scores, values, initial, reset = pool_inputs(2, 70, 8, score_dim, spread=10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, v = scores.bfloat16().requires_grad_(), values.bfloat16().requires_grad_()
        out, state = prefix_softmax_pool(s, v, initial, reset)
        ref, ref_state = naive_prefix_softmax_pool(s, v, initial, reset)
    assert chunked_calls == [True]
    assert out.dtype == torch.float32 and all(x.dtype == torch.float32 for x in state)
    assert rel_err(out, ref) <= 1e-5 and all(rel_err(x, y) <= 1e-5 for x, y in zip(state[1:], ref_state[1:]))
    weight = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad((out * weight).sum(), [s, v]),
                    torch.autograd.grad((ref * weight).sum(), [s, v])):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) <= 1e-2


@pytest.mark.parametrize("score_dim", [1, 6])
def test_a_spread_of_600_across_chunks_stays_chunked_and_exact(small_chunks, chunked_calls, score_dim):
    # the scores climb from -300 to 300 over the window: each chunk's max rises little, the running
    # max at chunk ends a lot; the pairwise gates between chunks are exact at any spread
    scores, values, initial, reset = pool_inputs(2, 150, 6, score_dim, spread=2.0)
    scores = scores + torch.linspace(-300.0, 300.0, 150).view(1, -1, 1)
    scores[1] = scores[1].flip(0)  # and falling: the first token's max holds to the end of its document
    scores.requires_grad_()
    out, (m, n, d) = prefix_softmax_pool(scores, values, initial, reset)
    assert chunked_calls == [True]
    ref, (rm, rn, rd) = naive_prefix_softmax_pool(scores, values, initial, reset)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-5 and torch.equal(m, rm)
    assert rel_err(n, rn) <= 1e-5 and rel_err(d, rd) <= 1e-5
    weight = torch.randn_like(out)
    grad, = torch.autograd.grad((out * weight).sum(), scores)
    ref_grad, = torch.autograd.grad((ref * weight).sum(), scores)
    assert torch.isfinite(grad).all() and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("case", ["jump inside a chunk", "huge value"])
def test_chunked_pool_hands_over_to_the_scan_where_float32_cannot_hold_it(small_chunks, chunked_calls, case):
    scores, values, initial, reset = pool_inputs(2, 40, 4, 4, spread=4.0)
    if case == "jump inside a chunk":
        scores[:, 20] = 200.0  # tokens 16-19 sit ~200 below their chunk's reference max
        reset[:, 16:21] = False
    else:
        values[1, 30, 2] = 1e20  # terms up to e^40 |v| could overflow a float32 sum
    out, (m, n, d) = prefix_softmax_pool(scores, values, initial, reset)
    assert chunked_calls == [False]
    ref, (rm, rn, rd) = naive_prefix_softmax_pool(scores, values, initial, reset)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-5 and torch.equal(m, rm)


def test_chunked_prefix_sum_stays_exact_after_a_huge_document(small_chunks):
    x = torch.full((1, 30, 1), 1e8)
    x[:, 21:] = 1e-3
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, 21] = True  # inside a chunk: the mask cuts the huge document off, nothing is subtracted
    out, final = prefix_sum(x, torch.ones(1, 1), reset)
    assert torch.allclose(out[0, 21:, 0], torch.arange(1, 10) * 1e-3, rtol=1e-6)
    assert out[0, 0, 0] == 1e8 + 1 and torch.allclose(final, torch.tensor([[9e-3]]), rtol=1e-6)
