"""Chunked segmented sums: the fast ops' recurrences in a few large calls instead of many small ones.

The pool's numerator and denominator and ``prefix_sum`` are sums over each position's document
prefix, with a decay from position j to position i (j <= i, same document)::

    h_i = sum_j exp(level_j - level_i) v_j

where ``level`` never decreases inside a document (the running max of the scores; none, i.e. a
decay of 1, for a plain sum). They are computed in two stages, each a handful of calls:

* inside chunks of ``CHUNK`` positions: one batched matmul with the chunk's [C, C] mask, lower
  triangular and cut at document starts (``chunk_mask``), the terms scaled to one reference per
  chunk by the caller;
* across chunks: the chunk totals form the same kind of sum, ``CHUNK`` times shorter, which
  ``decayed_sums`` solves in groups of ``GROUP`` with the exact pairwise decays (every factor
  ``exp(level_j - level_i) <= 1``, so no score spread overflows), recursing on the groups' totals.

Nothing is ever subtracted, so a sum after a huge document stays exact. The backward of each stage
is the same stage transposed: the mask's transpose, ``decayed_sums(..., reverse=True)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 64
"""Positions per chunk of the first stage (a [64, 64] mask matmul per chunk), where every term has
its own weight per channel; half as many where the terms' weights are one per position (there the
mask matmul is most of the work, and the chunk totals cost little)."""

GROUP = 64
"""Chunk totals per group of the second stage (64 x 64 pairwise decays per group and channel;
4 x as many with one level per position, where the decays are one small matmul)."""


@functools.cache
def _order(size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """[size, size] masks of positions (i, j): j <= i as float, j > i and j < i as bool."""
    after = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    return (~after).float(), after, after.mT.contiguous()


def chunk_mask(doc: Tensor) -> Tensor:
    """[..., C, C] float: 1 where position j feeds position i inside a chunk (j <= i, same document).

    ``doc`` [..., C] is each position's document id (any numbering that is equal within a document)."""
    size = doc.shape[-1]
    return (doc.view(*doc.shape, 1) == doc.view(*doc.shape[:-1], 1, size)) * _order(size, doc.device)[0]


@dataclass
class Chunks:
    """A [B, T] window cut into n chunks of C positions, and its documents: what both stages need."""
    length: int
    doc: Tensor        # [B, n, C] int64: resets so far inside the chunk (0: the state entering the chunk)
    first: Tensor      # [B, n, C] float: 1 where a position continues the state entering its chunk
    chunk_doc: Tensor  # [B, n] int64: document at each chunk's end (resets so far in the window)
    mask: Tensor       # [B n, C, C] float: ``chunk_mask`` of each chunk

    @classmethod
    def cut(cls, reset: Tensor | None, batch: int, length: int, device: torch.device, size: int) -> Chunks:
        """Chunks of ``size`` positions (the last one padded) of a window with document starts ``reset``."""
        chunks = -(-length // size)
        pad = chunks * size - length
        if reset is None:
            doc = torch.zeros(batch, chunks, size, dtype=torch.long, device=device)
        else:
            doc = (F.pad(reset, (0, pad)) if pad else reset).view(batch, chunks, size).cumsum(2)
        return cls(length, doc, (doc == 0).float(), doc[:, :, -1].cumsum(1), chunk_mask(doc).view(-1, size, size))

    def split(self, x: Tensor, fill: float = 0.0, copy: bool = False) -> Tensor:
        """[B, T, F] -> [B, n, C, F], the padding after the end set to ``fill``; a view of ``x`` where
        there is no padding, unless ``copy``."""
        batch, chunks, size = self.doc.shape
        pad = chunks * size - self.length
        if pad:
            x = F.pad(x, (0, 0, 0, pad), value=fill)
        elif copy:
            x = x.clone(memory_format=torch.contiguous_format)
        return x.reshape(batch, chunks, size, x.shape[-1])

    def join(self, x: Tensor) -> Tensor:
        """[B, n, C, F] -> [B, T, F]: the chunks' positions in order, the padding dropped."""
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return flat[:, :self.length] if flat.shape[1] != self.length else flat


@dataclass
class Carry:
    """The second stage's factors, each [B, n, 1, K] (K = 1, or one per last-dim channel).

    A plain segmented sum has levels 0 and every factor 1 (None)."""
    levels: Tensor                # non-decreasing inside a document: the decay i <- j is exp(level_j - level_i)
    from_initial: Tensor          # initial state -> the state at each chunk's end (0 outside document 0)
    to_total: Tensor | None = None    # a chunk's sum at its last position -> that chunk's total
    into_chunk: Tensor | None = None  # the state entering a chunk -> its positions


def scan_chunks(terms: Tensor, chunks: Chunks, carry: Carry, initial: Tensor) -> tuple[Tensor, Tensor]:
    """Each position's sum over its document prefix, both stages.

    Args:
        terms: [B, n, C, R, V].
        initial: [B, 1, R, V], the state before the window (document 0).

    Returns:
        sums [B, n, C, R, V] and the state at each chunk's end [B, n, R, V] (the last one: the window's).
    """
    batch, count, size = terms.shape[:3]
    sums = torch.bmm(chunks.mask, terms.view(batch * count, size, -1)).view(terms.shape)
    totals = sums[:, :, -1] if carry.to_total is None else sums[:, :, -1] * carry.to_total
    state = decayed_sums(totals, carry.levels, chunks.chunk_doc).addcmul_(carry.from_initial, initial)
    entering = torch.cat([initial, state[:, :-1]], 1)
    if carry.into_chunk is not None:
        entering.mul_(carry.into_chunk)
    sums.addcmul_(chunks.first.view(batch, count, size, 1, 1), entering.unsqueeze(2))
    return sums, state


def scan_chunks_backward(grad: Tensor, final_grad: Tensor | None, chunks: Chunks, carry: Carry,
                         initial_grad: bool) -> tuple[Tensor, Tensor | None]:
    """The transpose of ``scan_chunks``: gradients of its terms and initial state.

    Args:
        grad: [B, n, C, R, V], the sums' gradient (overwritten).
        final_grad: [B, R, V] of the window's final state, or None.
        initial_grad: whether to return the initial state's gradient [B, R, V] (else None).
    """
    batch, count, size = grad.shape[:3]
    d_entering = torch.bmm(chunks.first.view(-1, 1, size), grad.view(batch * count, size, -1)).view(
        (batch, count) + grad.shape[3:])
    if carry.into_chunk is not None:
        d_entering.mul_(carry.into_chunk)
    if final_grad is None:
        d_state = F.pad(d_entering[:, 1:], (0, 0, 0, 0, 0, 1))
    else:
        d_state = torch.cat([d_entering[:, 1:], final_grad.unsqueeze(1)], 1)
    d_totals = decayed_sums(d_state, carry.levels, chunks.chunk_doc, reverse=True)
    if carry.to_total is None:
        grad[:, :, -1] += d_totals
    else:
        grad[:, :, -1].addcmul_(carry.to_total, d_totals)
    d_terms = torch.bmm(chunks.mask.mT, grad.view(batch * count, size, -1)).view(grad.shape)
    d_initial = d_entering[:, 0] + (carry.from_initial * d_state).sum(1) if initial_grad else None
    return d_terms, d_initial


def running_max_by_document(values: Tensor, doc: Tensor, initial: Tensor) -> Tensor:
    """Running max of ``values`` [B, N, ...] along dim 1 from ``initial`` [B, ...], restarted where
    the document id ``doc`` [B, N] (non-decreasing; ``initial`` is document 0) changes. Exact.

    One ``cummax`` over int64 keys (document id, then the float's order-preserving bits): the key of
    a later document beats every earlier one, so the maximum restarts there.
    """
    bits = torch.cat([initial.unsqueeze(1), values], 1).view(torch.int32).long()
    docs = (F.pad(doc, (1, 0)) << 32).view(doc.shape[0], -1, *([1] * (values.dim() - 2)))
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # a signed order equal to the floats'
    top = (keys + docs).cummax(1).values - docs
    return torch.where(top < 0, top ^ 0x7FFFFFFF, top).int().view(torch.float32)[:, 1:]


def _pairwise(values: Tensor, levels: Tensor, doc: Tensor, reverse: bool) -> Tensor:
    """``decayed_sums`` of short sequences, directly: values [M, G, R, V], levels [M, G, 1, K]
    (K = 1 or V), doc [M, G]."""
    rows, size = doc.shape
    blocked = (doc.view(rows, size, 1) != doc.view(rows, 1, size)) | _order(size, doc.device)[2 if reverse else 1]
    gap = levels.unsqueeze(2) - levels.unsqueeze(1) if reverse else levels.unsqueeze(1) - levels.unsqueeze(2)
    # [M, i, j, 1, K]: exp(level_j - level_i) for j <= i (exp(level_i - level_j) for j >= i), never above 1
    decay = gap.masked_fill_(blocked.view(rows, size, size, 1, 1), float("-inf")).exp_()
    if levels.shape[-1] == 1:  # one level per position: a matmul
        return torch.bmm(decay.view(rows, size, size), values.view(rows, size, -1)).view(values.shape)
    return (decay * values.unsqueeze(1)).sum(2)


def decayed_sums(values: Tensor, levels: Tensor, doc: Tensor, reverse: bool = False) -> Tensor:
    """``h_i = sum_{j <= i, doc_j == doc_i} exp(levels_j - levels_i) values_j`` along dim 1.

    Args:
        values: [B, N, R, V].
        levels: [B, N, 1, K], one level per position (K = 1) or per last-dim channel (K = V),
            non-decreasing along dim 1 inside a document.
        doc: [B, N] int64 document ids, non-decreasing.
        reverse: the transpose (the backward): ``h_j = sum_{i >= j, doc_i == doc_j} exp(levels_j - levels_i) values_i``.

    Returns:
        h [B, N, R, V].
    """
    batch, length = values.shape[:2]
    group = GROUP if levels.shape[-1] > 1 else 4 * GROUP  # one level per position: a cheap matmul
    if length <= group:
        return _pairwise(values, levels, doc, reverse)
    groups = -(-length // group)
    pad = groups * group - length
    if pad:  # padding continues the last document, adds nothing and keeps the last level
        values = torch.cat([values, values.new_zeros((batch, pad) + values.shape[2:])], 1)
        levels = torch.cat([levels, levels[:, -1:].expand((batch, pad) + levels.shape[2:])], 1)
        doc = torch.cat([doc, doc[:, -1:].expand(batch, pad)], 1)
    grouped = (batch, groups, group)
    levels, doc = levels.reshape(grouped + levels.shape[2:]), doc.view(grouped)
    local = _pairwise(values.reshape((-1, group) + values.shape[2:]), levels.flatten(0, 1), doc.flatten(0, 1),
                      reverse).view(grouped + values.shape[2:])
    # the groups' edge positions (last ones; first ones when reversed) form the same sum group times
    # shorter; each group then takes in the full sum at its neighbour's edge, decayed to each of its
    # positions of that document
    edge = 0 if reverse else -1
    edges = decayed_sums(local[:, :, edge], levels[:, :, edge], doc[:, :, edge], reverse)
    source, target = (slice(1, None), slice(None, -1)) if reverse else (slice(None, -1), slice(1, None))
    source_level = levels[:, source, edge].unsqueeze(2)
    gap = levels[:, target] - source_level if reverse else source_level - levels[:, target]
    other = (doc[:, target] != doc[:, source, edge].unsqueeze(2)).view(gap.shape[:3] + (1,) * (levels.dim() - 3))
    local[:, target].addcmul_(gap.masked_fill_(other, float("-inf")).exp_(), edges[:, source].unsqueeze(2))
    local = local.view((batch, groups * group) + values.shape[2:])
    return local[:, :length] if pad else local
