"""prefix_softmax_pool and prefix_sum against float64 token-by-token loops and the naive forms."""

from __future__ import annotations

import pytest
import torch

from zarvan_dist.ops import EMPTY_MAX, prefix_softmax_pool, prefix_sum
from zarvan_dist.ops.naive import naive_prefix_softmax_pool, naive_prefix_sum
from numerics import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


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


def random_inputs(batch, length, width, score_dim, spread=4.0, with_state=True, device="cpu"):
    scores = (torch.rand(batch, length, score_dim, device=device) - 0.5) * spread
    values = torch.randn(batch, length, width, device=device)
    reset = torch.rand(batch, length, device=device) < 0.1
    if with_state:
        initial = (torch.randn(batch, score_dim, device=device) * spread / 4, torch.randn(batch, width, device=device),
                   torch.rand(batch, score_dim, device=device) + 0.5)
    else:
        initial = (torch.full((batch, score_dim), EMPTY_MAX, device=device), torch.zeros(batch, width, device=device),
                   torch.zeros(batch, score_dim, device=device))
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_dim", [1, 12])
@pytest.mark.parametrize("length,chunk", [(1, 8), (37, 8), (131, 4), (300, 16)])
@pytest.mark.parametrize("spread", [4.0, 600.0])
def test_fast_pool_matches_naive_outputs_states_and_every_gradient(device, score_dim, length, chunk, spread):
    torch.manual_seed(length + score_dim)
    scores, values, initial, reset = random_inputs(2, length, 12, score_dim, spread=spread, device=device)
    if spread > 200:
        scores[:, length // 2] = spread  # a jump far above everything before it, inside one block
    reset[:, 0] = False  # the carried state reaches the first tokens
    inputs = [scores.requires_grad_(), values.requires_grad_(), initial[1].requires_grad_(), initial[2].requires_grad_()]
    out, (m, n, d) = prefix_softmax_pool(scores, values, initial, reset, chunk)
    ref, (rm, rn, rd) = naive_prefix_softmax_pool(scores, values, initial, reset, 64)
    assert torch.isfinite(out).all() and torch.isfinite(n).all() and torch.isfinite(d).all()
    assert rel_err(out, ref) <= 1e-5 and torch.equal(m, rm)
    assert rel_err(n, rn) <= 1e-5 and rel_err(d, rd) <= 1e-5
    # every input gradient, through the output and the final state
    w_out, w_n, w_d = torch.randn_like(out), torch.randn_like(n), torch.randn_like(d)
    loss = (out * w_out).sum() + (n * w_n).sum() + (d * w_d).sum()
    ref_loss = (ref * w_out).sum() + (rn * w_n).sum() + (rd * w_d).sum()
    for g, r in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref_loss, inputs)):
        assert torch.isfinite(g).all() and rel_err(g, r) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_dim", [1, 8])
def test_fast_pool_under_bfloat16_autocast_matches_naive(device, score_dim):
    scores, values, initial, reset = random_inputs(2, 70, 8, score_dim, spread=400.0, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        s, v = scores.bfloat16().requires_grad_(), values.bfloat16().requires_grad_()
        out, state = prefix_softmax_pool(s, v, initial, reset)
        ref, ref_state = naive_prefix_softmax_pool(s, v, initial, reset)
    assert out.dtype == torch.float32 and all(x.dtype == torch.float32 for x in state)
    assert rel_err(out, ref) <= 1e-5 and all(rel_err(x, y) <= 1e-5 for x, y in zip(state[1:], ref_state[1:]))
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), [s, v])
    ref_grads = torch.autograd.grad((ref * weight).sum(), [s, v])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_fast_prefix_sum_matches_naive_with_gradients(device):
    x = torch.randn(3, 301, 7, device=device, requires_grad=True)
    initial = torch.randn(3, 7, device=device, requires_grad=True)
    reset = torch.rand(3, 301, device=device) < 0.05
    out, final = prefix_sum(x, initial, reset)
    ref, ref_final = naive_prefix_sum(x, initial, reset)
    assert rel_err(out, ref) <= 1e-5 and rel_err(final, ref_final) <= 1e-5
    weight = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad((out * weight).sum(), [x, initial]),
                    torch.autograd.grad((ref * weight).sum(), [x, initial])):
        assert rel_err(g, r) <= 1e-5


def test_prefix_sum_after_a_huge_document_keeps_the_small_one_exact():
    # the naive form subtracts the sum before the reset; the scan never does
    x = torch.full((1, 6, 1), 1e8)
    x[:, 3:] = 1e-3
    reset = torch.tensor([[False, False, False, True, False, False]])
    out, _ = prefix_sum(x, None, reset)
    assert torch.allclose(out[0, 3:, 0], torch.tensor([1e-3, 2e-3, 3e-3]), rtol=1e-6)


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
