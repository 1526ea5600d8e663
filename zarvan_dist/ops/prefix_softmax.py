"""Causal softmax pooling over the prefix, as one exact linear scan, in float32.

For every position t and channel c::

    out[t, c] = sum_{tau <= t} exp(s[tau, c]) v[tau, c] / sum_{tau <= t} exp(s[tau, c])

where the prefix starts at the last reset at or before t (or continues the carried state).
The state of a prefix is the online-softmax triple (m, n, d): running max m, numerator n and
denominator d taken relative to m.

With ``M_t`` the running max of the scores (restarted at resets, starting from the carried m),
numerator and denominator are first-order linear recurrences whose gates lie in [0, 1]::

    n_t = exp(M_{t-1} - M_t) n_{t-1} + exp(s_t - M_t) v_t
    d_t = exp(M_{t-1} - M_t) d_{t-1} + exp(s_t - M_t)          (gate 0 at a reset)

Every exponent is <= 0 and the term of the token that set the max is exactly 1, so no score
spread overflows, underflows to 0/0 or cancels: the result is the token-by-token loop's, in
O(T) work (``zarvan_dist.ops.scan.linear_scan``). ``M`` only picks the reference point of n and
d; the result does not depend on it, so it carries no gradient, and the scores' gradient flows
through ``exp(s - M)``. ``zarvan_dist.ops.naive.naive_prefix_softmax_pool`` is the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zarvan_dist.ops.scan import DEFAULT_BLOCK, linear_scan, running_max

EMPTY_MAX = -1e30
"""Running max of an empty prefix: finite, so that max - max is 0 and never NaN."""


def empty_softmax_state(batch: int, score_dim: int, value_dim: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """The state of an empty prefix: (m [B, S] = EMPTY_MAX, n [B, E] = 0, d [B, S] = 0), float32."""
    return (
        torch.full((batch, score_dim), EMPTY_MAX, device=device),
        torch.zeros(batch, value_dim, device=device),
        torch.zeros(batch, score_dim, device=device),
    )


def pool_arguments(scores: Tensor, values: Tensor, initial_state: tuple[Tensor, Tensor, Tensor] | None
                   ) -> tuple[int, tuple[Tensor, Tensor, Tensor]]:
    """The score width S (1 or E; else a ValueError naming both shapes) and the initial state in float32
    (the empty one for None): what every form of ``prefix_softmax_pool`` starts from."""
    batch, length, width = values.shape
    score_dim = scores.shape[-1]
    if scores.shape[:2] != (batch, length) or score_dim not in (1, width):
        raise ValueError(f"scores {tuple(scores.shape)} do not match values {tuple(values.shape)}")
    if initial_state is None:
        initial_state = empty_softmax_state(batch, score_dim, width, values.device)
    m0, n0, d0 = (x.float() for x in initial_state)
    return score_dim, (m0, n0, d0)


def prefix_softmax_pool(
    scores: Tensor,
    values: Tensor,
    initial_state: tuple[Tensor, Tensor, Tensor] | None = None,
    reset: Tensor | None = None,
    chunk_size: int = DEFAULT_BLOCK,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Softmax-weighted mean of ``values`` over each position's prefix.

    Args:
        scores: [B, T, S] with S == E (one softmax per channel) or S == 1 (one per position).
        values: [B, T, E].
        initial_state: (m [B, S], n [B, E], d [B, S]) of the prefix before position 0, or None
            for an empty prefix.
        reset: [B, T] bool; True at t drops everything before t (a new document starts).
        chunk_size: block length of the scan (>= 2); the result does not depend on it.

    Returns:
        out: [B, T, E] float32.
        final_state: (m, n, d) after position T-1, float32 (m carries no gradient).
    """
    batch, length, width = values.shape
    score_dim, (m0, n0, d0) = pool_arguments(scores, values, initial_state)
    if length == 0:
        return values.float(), (m0, n0, d0)

    s = scores.float()
    r = reset.to(device=values.device, dtype=torch.bool) if reset is not None else None
    with torch.no_grad():
        m = running_max(s, m0, r, chunk_size)  # [B, T, S]
        gate = torch.exp(torch.cat([m0[:, None], m[:, :-1]], 1) - m)
        if r is not None:
            gate = gate.masked_fill_(r[..., None], 0.0)
    w = torch.exp(s - m)
    # numerator and denominator share one scan and its gates
    if score_dim == width:
        h = linear_scan(gate[:, :, None], torch.stack([w * values.float(), w], 2), torch.stack([n0, d0], 1), chunk_size)
        n, d = h.unbind(2)
    else:
        h = linear_scan(gate, torch.cat([w * values.float(), w], -1), torch.cat([n0, d0], -1), chunk_size)
        n, d = h.split([width, score_dim], -1)
    # the state is contiguous, as the empty state is: a carried state keeps one layout (no recompiles)
    return n / d, (m[:, -1].contiguous(), n[:, -1].contiguous(), d[:, -1].contiguous())
