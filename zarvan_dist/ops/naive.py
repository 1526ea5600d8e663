"""The pure-PyTorch references of the fast ops: the ground truth their tests compare against.

``naive_prefix_softmax_pool`` is the online-softmax parallel scan (Hillis-Steele inside chunks,
then over chunk totals); ``naive_prefix_sum`` is a cumulative sum with the sum before each
document start subtracted (a small document after a huge one loses its digits). The pool is exact
at any score spread but costs O(T log C) work and many small calls (about 2,000 ATen calls forward
+ backward at [1, 4096, 768]), which is why the models call ``prefix_softmax_pool`` and
``prefix_sum`` instead (the chunked scans of ``ops.chunked`` eager, the linear scans of ``ops.scan``
compiled).

The parallel scan: the state of a prefix is the online-softmax triple (m, n, d): running max m,
numerator n and denominator d taken relative to m. Merging two adjacent pieces is associative::

    M = max(m1, m2);  n = n1 e^(m1-M) + n2 e^(m2-M);  d = d1 e^(m1-M) + d2 e^(m2-M)

(with the left piece dropped when the right one starts with a reset). The running max only
picks the reference point of n and d; the result does not depend on it, so it is computed
without gradient, and scores enter through ``exp(s - stop_grad(s))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zarvan_dist.ops.prefix_softmax import EMPTY_MAX, pool_arguments
from zarvan_dist.ops.segments import last_reset_index

_Piece = tuple[Tensor, Tensor, Tensor, Tensor]


def _merge(left: _Piece, right: _Piece) -> _Piece:
    """Online-softmax merge of adjacent pieces (m, n, d, starts_with_reset); broadcasts."""
    lm, ln, ld, lr = left
    rm, rn, rd, rr = right
    # a reset drops the left piece whole, its max included (else the right one could underflow)
    lm = torch.where(rr, EMPTY_MAX, lm)
    m = torch.maximum(lm, rm)
    a = torch.exp(lm - m)
    b = torch.exp(rm - m)
    return m, ln * a + rn * b, ld * a + rd * b, lr | rr


def _scan(piece: _Piece, dim: int) -> _Piece:
    """Inclusive Hillis-Steele scan of pieces along ``dim`` (log2(length) merges)."""
    length = piece[0].shape[dim]
    step = 1
    while step < length:
        left = tuple(x.narrow(dim, 0, length - step) for x in piece)
        right = tuple(x.narrow(dim, step, length - step) for x in piece)
        merged = _merge(left, right)  # type: ignore[arg-type]
        piece = tuple(torch.cat([x.narrow(dim, 0, step), y], dim) for x, y in zip(piece, merged))  # type: ignore[assignment]
        step *= 2
    return piece


def naive_prefix_softmax_pool(
    scores: Tensor,
    values: Tensor,
    initial_state: tuple[Tensor, Tensor, Tensor] | None = None,
    reset: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``prefix_softmax_pool`` as a Hillis-Steele scan of online-softmax triples (same contract)."""
    batch, length, width = values.shape
    score_dim, (m0, n0, d0) = pool_arguments(scores, values, initial_state)
    device = values.device
    if length == 0:
        return values.float(), (m0, n0, d0)

    s = scores.float()
    m = s.detach()
    w = torch.exp(s - m)  # ones, carrying the gradient of the scores
    n = values.float() * w
    d = w
    r = (reset if reset is not None else torch.zeros(batch, length, dtype=torch.bool, device=device))
    r = r.to(device=device, dtype=torch.bool)[..., None]

    chunk = max(1, min(chunk_size, length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        # the identity piece: contributes nothing to any prefix
        m = torch.cat([m, m.new_full((batch, pad, score_dim), EMPTY_MAX)], 1)
        n = torch.cat([n, n.new_zeros(batch, pad, width)], 1)
        d = torch.cat([d, d.new_zeros(batch, pad, score_dim)], 1)
        r = torch.cat([r, r.new_zeros(batch, pad, 1)], 1)

    def chunked(x: Tensor) -> Tensor:
        return x.reshape(batch, n_chunks, chunk, x.shape[-1])

    local = _scan((chunked(m), chunked(n), chunked(d), chunked(r)), dim=2)
    totals = tuple(x[:, :, -1] for x in local)
    first = (m0[:, None], n0[:, None], d0[:, None], r.new_zeros(batch, 1, 1))
    prefix = _scan(tuple(torch.cat([f, t], 1) for f, t in zip(first, totals)), dim=1)  # type: ignore[arg-type]
    before = tuple(x[:, :n_chunks, None] for x in prefix)
    _, n_out, d_out, _ = _merge(before, local)  # type: ignore[arg-type]
    out = (n_out / d_out).reshape(batch, n_chunks * chunk, width)[:, :length]
    final = (prefix[0][:, -1], prefix[1][:, -1], prefix[2][:, -1])
    return out, final


def naive_prefix_sum(x: Tensor, initial_state: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``prefix_sum`` as one cumulative sum minus the sum before each document start (same contract)."""
    x = x.float()
    initial = initial_state.float() if initial_state is not None else x.new_zeros(x.shape[0], x.shape[2])
    if x.shape[1] == 0:
        return x, initial
    total = initial[:, None] + torch.cumsum(x, dim=1)
    if reset is not None:
        last = last_reset_index(reset)
        # subtract what was accumulated before the segment's first token
        before = torch.cat([initial[:, None], total[:, :-1]], dim=1)
        base = torch.gather(before, 1, last.clamp(min=0)[..., None].expand_as(total))
        total = torch.where((last >= 0)[..., None], total - base, total)
    return total, total[:, -1]
