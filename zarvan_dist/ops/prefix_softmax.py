"""Causal softmax pooling over the prefix, chunk-wise, in float32.

For every position t and channel c::

    out[t, c] = sum_{tau <= t} exp(s[tau, c]) v[tau, c] / sum_{tau <= t} exp(s[tau, c])

where the prefix starts at the last reset at or before t (or continues the carried state).
The state of a prefix is the online-softmax triple (m, n, d): running max m, numerator n and
denominator d taken relative to m, so every exponent is <= 0 and no score spread can overflow.

Merging two adjacent pieces is associative::

    M = max(m1, m2);  n = n1 e^(m1-M) + n2 e^(m2-M);  d = d1 e^(m1-M) + d2 e^(m2-M)

(with the left piece dropped when the right one starts with a reset), so the prefix is a
parallel scan: a Hillis-Steele scan inside each chunk, the same scan over the chunk totals
(with the initial state in front), and one merge of each chunk with the total of all before it.
The running max only picks the reference point of n and d; the result does not depend on it,
so it is computed without gradient, and scores enter through ``exp(s - stop_grad(s))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

EMPTY_MAX = -1e30
"""Running max of an empty prefix: finite, so that max - max is 0 and never NaN."""

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


def empty_softmax_state(batch: int, score_dim: int, value_dim: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """The state of an empty prefix: (m [B, S] = EMPTY_MAX, n [B, E] = 0, d [B, S] = 0), float32."""
    return (
        torch.full((batch, score_dim), EMPTY_MAX, device=device),
        torch.zeros(batch, value_dim, device=device),
        torch.zeros(batch, score_dim, device=device),
    )


def prefix_softmax_pool(
    scores: Tensor,
    values: Tensor,
    initial_state: tuple[Tensor, Tensor, Tensor] | None = None,
    reset: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Softmax-weighted mean of ``values`` over each position's prefix.

    Args:
        scores: [B, T, S] with S == E (one softmax per channel) or S == 1 (one per position).
        values: [B, T, E].
        initial_state: (m [B, S], n [B, E], d [B, S]) of the prefix before position 0, or None
            for an empty prefix.
        reset: [B, T] bool; True at t drops everything before t (a new document starts).
        chunk_size: scan chunk length; the result does not depend on it.

    Returns:
        out: [B, T, E] float32.
        final_state: (m, n, d) after position T-1, float32 (m carries no gradient).
    """
    batch, length, width = values.shape
    score_dim = scores.shape[-1]
    if scores.shape[:2] != (batch, length) or score_dim not in (1, width):
        raise ValueError(f"scores {tuple(scores.shape)} do not match values {tuple(values.shape)}")
    device = values.device
    if initial_state is None:
        initial_state = empty_softmax_state(batch, score_dim, width, device)
    m0, n0, d0 = (x.float() for x in initial_state)
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
