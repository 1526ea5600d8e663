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

Two forms compute it:

* Eager calls longer than a chunk (64 tokens; 32 with one score per position): the chunked form
  (``zarvan_dist.ops.chunked``). Each chunk shares one reference R (its max and the max carried
  into it, less ``OFFSET``); its terms ``(w v, w)``, ``w = exp(s - R)``, are summed by one mask
  matmul; the chunk totals are carried across chunks with the exact pairwise gates
  ``exp(M_j - M_i)`` (M the running max at chunk ends). Its backward is written out
  (``_ChunkedPool``). The number of calls does not grow with T up to 64 chunks (4,096 tokens;
  a few more for each further factor 64): about 350 ATen events forward and backward at
  [1, 4096, 768], against ~2,150 for the reference (``benchmarks/bench_ops.py``). Its one limit
  is float32's range: a token whose running max lies ~90 or more below its chunk's R (the
  max jumped that much inside the chunk) would lose its terms to underflow, and values above
  ``LARGEST_VALUE`` could overflow a sum. Every call checks both (one host sync) and, where either
  fails, computes that call with the blocked scan instead: exact at any spread.
* Compiled, short and out-of-range calls: the blocked linear scan (``ops.scan``), which
  torch.compile fuses into a few kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from zarvan_dist.ops import chunked
from zarvan_dist.ops.chunked import Carry, Chunks, running_max_by_document, scan_chunks, scan_chunks_backward
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
    s, x = scores.float(), values.float()
    r = reset.to(device=values.device, dtype=torch.bool) if reset is not None else None
    size = chunked.CHUNK if score_dim == width else chunked.CHUNK // 2
    if length > size and not torch.compiler.is_compiling():
        fwd = _chunked_forward(s, x, m0, n0, d0, r, size)
        if fwd is not None:
            out, n, d = _ChunkedPool.apply(s, x, n0, d0, fwd)
            return out, (fwd.final_max, n, d)
    return _blocked_pool(s, x, m0, n0, d0, r, chunk_size)


def _blocked_pool(s: Tensor, x: Tensor, m0: Tensor, n0: Tensor, d0: Tensor, r: Tensor | None, block: int
                  ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The pool as linear scans (``scan.linear_scan``): exact at any spread, autograd through the scan."""
    width, score_dim = x.shape[-1], s.shape[-1]
    with torch.no_grad():
        m = running_max(s, m0, r, block)  # [B, T, S]
        gate = torch.exp(torch.cat([m0[:, None], m[:, :-1]], 1) - m)
        if r is not None:
            gate = gate.masked_fill_(r[..., None], 0.0)
    w = torch.exp(s - m)
    # numerator and denominator share one scan and its gates
    if score_dim == width:
        h = linear_scan(gate[:, :, None], torch.stack([w * x, w], 2), torch.stack([n0, d0], 1), block)
        n, d = h.unbind(2)
    else:
        h = linear_scan(gate, torch.cat([w * x, w], -1), torch.cat([n0, d0], -1), block)
        n, d = h.split([width, score_dim], -1)
    # the state is contiguous, as the empty state is: a carried state keeps one layout (no recompiles)
    return n / d, (m[:, -1].contiguous(), n[:, -1].contiguous(), d[:, -1].contiguous())


OFFSET = 40.0
"""The chunked form's terms are exp(s - R + OFFSET), R the chunk's reference max: at most e^40."""

SMALLEST_DENOMINATOR = math.exp(-50.0)
"""Below this (relative to R - OFFSET) a denominator's own terms may have underflowed: use the scan."""

LARGEST_VALUE = 1e12
"""Above this |value| the chunked form's sums (terms up to e^40 |v|) could overflow: use the scan."""


class _Pairs:
    """Numerator and denominator side by side, so that both take one matmul and one decayed sum.

    One score per channel (S == E): [..., 2, E]; one per position (S == 1): [..., 1, E + 1]. Either
    way a per-score tensor [..., 1, S] broadcasts against them.
    """

    def __init__(self, width: int, score_dim: int):
        self.width, self.per_channel = width, score_dim == width
        self.shape = (2, width) if self.per_channel else (1, width + 1)

    def join(self, numerator: Tensor, denominator: Tensor) -> Tensor:
        """[B, E] and [B, S] -> [B, *shape]."""
        if self.per_channel:
            return torch.stack([numerator, denominator], 1)
        return torch.cat([numerator, denominator], 1).unsqueeze(1)

    def split(self, pairs: Tensor) -> tuple[Tensor, Tensor]:
        """[..., *shape] -> numerator [..., E] and denominator [..., S] (views)."""
        if self.per_channel:
            return pairs.unbind(-2)
        return pairs.select(-2, 0).split([self.width, 1], -1)


@dataclass
class _Chunked:
    """The chunked forward's outputs, and what its backward needs besides the inputs and output.
    Per-chunk tensors are [B, n, 1, S] (n chunks); R is the chunk's reference max minus OFFSET."""
    out: Tensor | None   # [B, T, E], handed to the autograd function (which keeps it as its output)
    final_max: Tensor    # [B, S]
    final: tuple[Tensor, Tensor]  # n [B, E] and d [B, S], relative to final_max
    denominator: Tensor  # [B, n, C, S], relative to R
    reference: Tensor    # R
    chunks: Chunks
    carry: Carry         # levels: the running max M at chunk ends
    pairs: _Pairs


def _chunked_forward(s: Tensor, x: Tensor, m0: Tensor, n0: Tensor, d0: Tensor, reset: Tensor | None, size: int
                     ) -> _Chunked | None:
    """The chunked form's forward in chunks of ``size`` (no autograd), or None where float32's range
    does not hold it."""
    batch, length, width = x.shape
    score_dim = s.shape[-1]
    pairs = _Pairs(width, score_dim)
    inf = float("inf")
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        chunks = Chunks.cut(reset, batch, length, x.device, size)
        s, x = chunks.split(s, -inf), chunks.split(x)
        count = s.shape[1]
        shut = (chunks.doc[:, :, :1] != 0).view(batch, count, 1, 1)  # the chunk's first token starts a document
        # R: the max of each chunk and of the state entering it; M: the running max at chunk ends (exact)
        top = s.amax(2, keepdim=True)
        if reset is None:
            last_top = top
        else:
            in_last = (chunks.doc == chunks.doc[:, :, -1:]).unsqueeze(-1)
            last_top = s.masked_fill(~in_last, -inf).amax(2, keepdim=True)
        m0 = m0.view(batch, 1, 1, score_dim)
        chunk_max = running_max_by_document(last_top, chunks.chunk_doc, m0[:, 0])
        max_in = torch.cat([m0, chunk_max[:, :-1]], 1)
        ref = torch.maximum(top, max_in.masked_fill(shut, -inf)).sub_(OFFSET)
        # the terms (w v, w), w = exp(s - R), written side by side
        terms = x.new_empty(s.shape[:3] + pairs.shape)
        weighted, weights = pairs.split(terms)
        torch.sub(s, ref, out=weights).exp_()
        torch.mul(weights, x, out=weighted)
        in_first_doc = (chunks.chunk_doc != 0).view(batch, count, 1, 1)
        carry = Carry(levels=chunk_max,
                      from_initial=torch.sub(m0, chunk_max).masked_fill_(in_first_doc, -inf).exp_(),
                      to_total=torch.sub(ref, chunk_max).exp_(),
                      into_chunk=torch.sub(max_in, ref).masked_fill_(shut, -inf).exp_())
        full, state = scan_chunks(terms, chunks, carry, pairs.join(n0, d0).unsqueeze(1))
        numerator, denominator = pairs.split(full)
        out = numerator / denominator
        # one sync: the denominators stayed in range and no value can have overflowed a sum
        lowest, smallest_value, largest_value = torch.stack([denominator.amin(), *torch.aminmax(x)]).tolist()
        if not (lowest >= SMALLEST_DENOMINATOR and -LARGEST_VALUE <= smallest_value and largest_value <= LARGEST_VALUE):
            return None
        final = tuple(part.contiguous() for part in pairs.split(state[:, -1]))
        return _Chunked(chunks.join(out), chunk_max[:, -1, 0].contiguous(), final, denominator.contiguous(), ref,
                        chunks, carry, pairs)


class _ChunkedPool(torch.autograd.Function):
    """Outputs and final (n, d) of ``_chunked_forward``; the backward is the two stages transposed."""

    @staticmethod
    def forward(ctx, s: Tensor, x: Tensor, n0: Tensor, d0: Tensor, fwd: _Chunked):
        out, fwd.out = fwd.out, None  # kept as an output below: the context must not hold it (a cycle)
        ctx.fwd = fwd
        ctx.save_for_backward(s, x, out)
        ctx.set_materialize_grads(False)  # an output without gradient comes as None, not zeros
        n, d = fwd.final
        return out, n, d

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_n: Tensor | None, d_d: Tensor | None):
        fwd: _Chunked = ctx.fwd
        s, x, out = ctx.saved_tensors
        pairs, chunks = fwd.pairs, fwd.chunks
        with torch.autocast(x.device.type, enabled=False):
            s, x, out = chunks.split(s), chunks.split(x), chunks.split(out)
            d_out = chunks.split(d_out) if d_out is not None else torch.zeros_like(out)
            # gradient of each position's (numerator, denominator): (g / d, -g y / d)
            grad = x.new_empty(x.shape[:3] + pairs.shape)
            d_num, d_den = pairs.split(grad)
            torch.div(d_out, fwd.denominator, out=d_num)
            if pairs.per_channel:
                torch.mul(d_num, out, out=d_den).neg_()
            else:
                torch.sum(d_num * out, -1, keepdim=True, out=d_den).neg_()
            final = None
            if d_n is not None or d_d is not None:
                final = pairs.join(d_n if d_n is not None else torch.zeros_like(fwd.final[0]),
                                   d_d if d_d is not None else torch.zeros_like(fwd.final[1]))
            d_terms, d_initial = scan_chunks_backward(grad, final, chunks, fwd.carry,
                                                      ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
            # back through the terms (w v, w)
            d_num, d_den = pairs.split(d_terms)
            weights = torch.sub(s, fwd.reference).exp_()  # recomputed: cheaper than keeping [B, T, S]
            d_x = weights * d_num
            d_weight = torch.addcmul(d_den, x, d_num) if pairs.per_channel else \
                (x * d_num).sum(-1, keepdim=True).add_(d_den)
            d_s = d_weight.mul_(weights)
            d_n0, d_d0 = pairs.split(d_initial) if d_initial is not None else (None, None)
        return chunks.join(d_s), chunks.join(d_x), d_n0, d_d0, None
