"""First-order linear recurrences along time, exact, in O(T) work: the fast ops' form under
torch.compile (which fuses it), for short calls, and where the chunked form (``ops.chunked``)
cannot hold a call in float32's range.

``linear_scan`` computes, for gates ``a`` and inputs ``b`` [B, T, ...]::

    h_t = a_t * h_{t-1} + b_t,      h_{-1} = initial

with no division and no exponent of a sum, so gates in [0, 1] (a document start is a gate 0)
never overflow, underflow to 0/0 or cancel: every product of gates only shrinks, exactly as
the token-by-token loop computes it. ``running_max`` is the same recurrence in the (max, +)
semiring: the running maximum restarted at document starts.

Blocked form (radix ``block``, default 8): time is cut into blocks; one pass over the block
positions, vectorised over all blocks, gives each block's scan from zero and the product of
its gates up to each position; the blocks' totals form a recurrence ``block`` times shorter,
solved the same way; one more pass adds each block's carried-in state times its gate products.
Work is O(T) and the calls O(block * log_block(T)); each call is an elementwise pass over a
[B, T / block, ...] slice. On a GPU the same recurrence is one fused kernel (flash-linear-
attention's HGRN ``fused_recurrent``); this form is its pure-PyTorch counterpart.

The backward of ``h = scan(a, b, h0)`` is the reverse scan ``g_t = dh_t + a_{t+1} g_{t+1}``:
``db = g``, ``dh0 = a_0 g_0``, ``da_t = g_t h_{t-1}`` (only when ``a`` needs a gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BLOCK = 8
"""Radix of the blocked scan; 8 is the fastest on CPU at T = 1k..4k (4 and 16 are 5-40 % slower)."""


def _fold(base: Tensor, gate: Tensor, state: Tensor, maxplus: bool) -> Tensor:
    """base (+) gate (x) state: ``base + gate * state``, or ``max(base, gate + state)``."""
    return torch.maximum(base, gate + state) if maxplus else torch.addcmul(base, gate, state)


def _steps(a: Tensor, b: Tensor, h0: Tensor, reverse: bool, maxplus: bool) -> Tensor:
    """The recurrence one position at a time along dim 1 (each step a whole slice)."""
    order = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    h, out = h0, []
    for t in order:
        h = _fold(b[:, t], a[:, t], h, maxplus)
        out.append(h)
    return torch.stack(out[::-1] if reverse else out, 1)


def _scan(a: Tensor, b: Tensor, h0: Tensor, block: int, reverse: bool = False, maxplus: bool = False) -> Tensor:
    """h along dim 1 (``reverse``: h_t = a_t h_{t+1} + b_t, h0 after the end). No autograd.

    Written without in-place updates of views, so that torch.compile traces it as it is.
    """
    batch, length = b.shape[:2]
    if length <= block:
        return _steps(a, b, h0, reverse, maxplus)
    n_blocks = -(-length // block)
    pad = n_blocks * block - length
    if pad:  # identity steps after the end: the gate passes the state on, the input adds nothing
        keep, nothing = (0.0, float("-inf")) if maxplus else (1.0, 0.0)
        a = F.pad(a, (0, 0) * (a.dim() - 2) + (0, pad), value=keep)
        b = F.pad(b, (0, 0) * (b.dim() - 2) + (0, pad), value=nothing)
    gates = a.view(batch, n_blocks, block, *a.shape[2:])
    inputs = b.view(batch, n_blocks, block, *b.shape[2:])
    # each block's scan from zero, and the gates composed from the block's edge to each position
    order = range(block - 1, -1, -1) if reverse else range(block)
    local, through = [inputs[:, :, order[0]]], [gates[:, :, order[0]]]
    for j in order[1:]:
        local.append(_fold(inputs[:, :, j], gates[:, :, j], local[-1], maxplus))
        through.append(gates[:, :, j] + through[-1] if maxplus else gates[:, :, j] * through[-1])
    totals = _scan(through[-1], local[-1], h0, block, reverse, maxplus)  # the state at each block's far edge
    if reverse:
        local, through = local[::-1], through[::-1]
        carried = torch.cat([totals[:, 1:], h0[:, None]], 1)
    else:
        carried = torch.cat([h0[:, None], totals[:, :-1]], 1)
    h = _fold(torch.stack(local, 2), torch.stack(through, 2), carried[:, :, None], maxplus)
    return h.view(batch, n_blocks * block, *b.shape[2:])[:, :length]


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor, block: int) -> Tensor:
        h = _scan(a, b, h0, block)
        ctx.save_for_backward(a, h, h0)
        ctx.block = block
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        a, h, h0 = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        g = _scan(a_next, dh.contiguous(), torch.zeros_like(h0), ctx.block, reverse=True)
        da = dh0 = None
        if ctx.needs_input_grad[0]:
            da = (g * torch.cat([h0[:, None], h[:, :-1]], 1)).sum_to_size(a.shape)
        if ctx.needs_input_grad[2]:
            dh0 = (a[:, 0] * g[:, 0]).sum_to_size(h0.shape)
        return da, g, dh0, None


def linear_scan(gates: Tensor, inputs: Tensor, initial: Tensor, block: int = DEFAULT_BLOCK) -> Tensor:
    """``h_t = gates_t * h_{t-1} + inputs_t`` along dim 1, with gradients to all three.

    Args:
        gates: [B, T, ...] broadcastable to ``inputs`` (e.g. [B, T, 1] for one gate per step).
        inputs: [B, T, ...].
        initial: ``inputs.shape`` without T, the state before position 0.
        block: radix of the blocked form; the result does not depend on it.

    Returns:
        h [B, T, ...], in the dtype of ``inputs`` (all three must share one dtype).
    """
    if block < 2:
        raise ValueError(f"block must be at least 2, got {block}")
    return _LinearScan.apply(gates, inputs.contiguous(), initial, block)


@torch.no_grad()
def running_max(x: Tensor, initial: Tensor, reset: Tensor | None, block: int = DEFAULT_BLOCK) -> Tensor:
    """Running maximum of ``x`` [B, T, ...] along dim 1 from ``initial`` [B, ...], restarted at
    every ``reset`` [B, T] (True: the maximum starts again from that token). No gradient."""
    cut = torch.zeros(x.shape[:2] + (1,) * (x.dim() - 2), dtype=x.dtype, device=x.device)
    if reset is not None:
        cut = cut.masked_fill_(reset.view(cut.shape).to(torch.bool), float("-inf"))
    return _scan(cut, x.contiguous(), initial, block, maxplus=True)
