"""linear_scan and running_max against token-by-token loops, on CPU and (when present) CUDA."""

from __future__ import annotations

import pytest
import torch

from zarvan_dist.ops.scan import linear_scan, running_max
from numerics import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def loop_scan(a, b, h0):
    h, out = h0, []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length,block", [(1, 2), (7, 2), (8, 8), (9, 8), (100, 3), (515, 8), (1000, 16)])
@pytest.mark.parametrize("gate_width", [1, 5])
def test_linear_scan_matches_the_loop_with_every_gradient(device, length, block, gate_width):
    torch.manual_seed(length)
    a = torch.rand(2, length, gate_width, dtype=torch.float64, device=device)
    a[torch.rand_like(a) < 0.1] = 0.0  # document starts
    b = torch.randn(2, length, 5, dtype=torch.float64, device=device)
    h0 = torch.randn(2, 5, dtype=torch.float64, device=device)
    inputs = [x.requires_grad_() for x in (a, b, h0)]
    h = linear_scan(a, b, h0, block)
    ref = loop_scan(a, b, h0)
    assert rel_err(h, ref) <= 1e-12
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((h * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-12


def test_linear_scan_gradcheck():
    a = torch.rand(1, 11, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 11, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: linear_scan(*x, block=3), (a, b, h0))


def test_gates_that_underflow_stay_exact_zeros_never_nan():
    a = torch.full((1, 300, 2), 1e-30)
    b = torch.rand(1, 300, 2)
    h = linear_scan(a, b, torch.full((1, 2), 1e30))
    assert torch.isfinite(h).all() and rel_err(h[:, 1:], b[:, 1:]) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length,block", [(1, 2), (9, 2), (64, 8), (301, 8)])
def test_running_max_restarts_at_resets(device, length, block):
    x = torch.randn(3, length, 4, device=device) * 100
    reset = torch.rand(3, length, device=device) < 0.1
    m0 = torch.randn(3, 4, device=device) * 100
    got = running_max(x, m0, reset, block)
    m, ref = m0, []
    for t in range(length):
        m = torch.where(reset[:, t, None], x[:, t], torch.maximum(m, x[:, t]))
        ref.append(m)
    assert torch.equal(got, torch.stack(ref, 1))
