"""prefix_softmax_pool and prefix_sum against float64 token-by-token loops."""

from __future__ import annotations

import pytest
import torch

from zarvan_dist.ops import EMPTY_MAX, prefix_softmax_pool, prefix_sum
from numerics import rel_err


def reference_pool(scores, values, initial, reset):
    """Online softmax one token at a time, float64: the formulas of docs/models.md, "Zarvan v2 block"."""
    s, v = scores.double(), values.double()
    m, n, d = (x.double().clone() for x in initial)
    outs = []
    for t in range(s.shape[1]):
        r = reset[:, t, None]
        m = torch.where(r, torch.full_like(m, EMPTY_MAX), m)
        n, d = torch.where(r, 0.0, n), torch.where(r, 0.0, d)
        m_new = torch.maximum(m, s[:, t])
        n = n * torch.exp(m - m_new) + torch.exp(s[:, t] - m_new) * v[:, t]
        d = d * torch.exp(m - m_new) + torch.exp(s[:, t] - m_new)
        m = m_new
        outs.append(n / d)
    return torch.stack(outs, 1), (m, n, d)


def random_inputs(batch, length, width, score_dim, spread=4.0, with_state=True):
    scores = (torch.rand(batch, length, score_dim) - 0.5) * spread
    values = torch.randn(batch, length, width)
    reset = torch.rand(batch, length) < 0.1
    if with_state:
        initial = (torch.randn(batch, score_dim), torch.randn(batch, width), torch.rand(batch, score_dim) + 0.5)
    else:
        initial = (torch.full((batch, score_dim), EMPTY_MAX), torch.zeros(batch, width), torch.zeros(batch, score_dim))
    return scores, values, initial, reset


@pytest.mark.parametrize("score_dim", [1, 6])
@pytest.mark.parametrize("length,chunk", [(1, 4), (17, 4), (33, 8), (20, 64)])
@pytest.mark.parametrize("with_state", [True, False])
def test_pool_matches_token_loop(score_dim, length, chunk, with_state):
    scores, values, initial, reset = random_inputs(3, length, 6, score_dim, with_state=with_state)
    out, (m, n, d) = prefix_softmax_pool(scores, values, initial, reset, chunk)
    ref, (rm, rn, rd) = reference_pool(scores, values, initial, reset)
    assert rel_err(out, ref) <= 1e-5
    # the final state may use another reference max: compare what it means, n/d and d e^m
    assert rel_err(n / d, rn / rd) <= 1e-5
    assert rel_err(d * torch.exp(m - rm.float()), rd) <= 1e-5


def test_pool_gradients_match_float64():
    scores, values, initial, reset = random_inputs(2, 19, 5, 5)
    inputs = [scores.requires_grad_(), values.requires_grad_(), initial[1].requires_grad_(), initial[2].requires_grad_()]
    weight = torch.randn(2, 19, 5)
    out, _ = prefix_softmax_pool(scores, values, initial, reset, chunk_size=4)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    ref, _ = reference_pool(scores, values, initial, reset)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


def test_chunk_size_does_not_change_the_result():
    scores, values, initial, reset = random_inputs(2, 50, 4, 4)
    a, _ = prefix_softmax_pool(scores, values, initial, reset, 3)
    b, _ = prefix_softmax_pool(scores, values, initial, reset, 64)
    assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("score_dim", [1, 8])
def test_scores_spread_over_200_stay_finite_and_exact(score_dim):
    scores, values, initial, reset = random_inputs(2, 64, 8, score_dim, spread=600.0, with_state=False)
    scores[:, 10] = 300.0  # a jump far above everything before it, inside one chunk
    scores[:, 11] = -300.0
    out, state = prefix_softmax_pool(scores, values, None, reset, chunk_size=16)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in state)
    ref, _ = reference_pool(scores, values, initial, reset)
    assert rel_err(out, ref) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = prefix_softmax_pool(scores.bfloat16(), values.bfloat16(), None, reset, chunk_size=16)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # bf16 inputs round the scores themselves; compare against the float64 pool of those inputs
    ref_low, _ = reference_pool(scores.bfloat16(), values.bfloat16(), initial, reset)
    assert rel_err(low, ref_low) <= 1e-2


def test_prefix_sum_with_resets_and_state():
    x = torch.randn(3, 21, 5)
    initial = torch.randn(3, 5)
    reset = torch.rand(3, 21) < 0.2
    out, final = prefix_sum(x, initial, reset)
    running, ref = initial.double().clone(), []
    for t in range(21):
        running = torch.where(reset[:, t, None], 0.0, running) + x[:, t].double()
        ref.append(running)
    ref = torch.stack(ref, 1)
    assert rel_err(out, ref) <= 1e-6 and rel_err(final, ref[:, -1]) <= 1e-6
