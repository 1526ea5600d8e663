"""Document segments inside a window: positions since the document start, segmented sums.

``reset`` [B, T] bool marks the tokens where a new document starts (a BOS); everything a
causal op carries is dropped before such a token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zarvan_dist.ops import chunked
from zarvan_dist.ops.chunked import Carry, Chunks, scan_chunks, scan_chunks_backward
from zarvan_dist.ops.scan import linear_scan


def last_reset_index(reset: Tensor) -> Tensor:
    """[B, T] int64: index of the last reset at or before t, or -1 where there is none."""
    idx = torch.arange(reset.shape[1], device=reset.device).expand_as(reset)
    return torch.where(reset, idx, torch.full_like(idx, -1)).cummax(dim=1).values


def segment_positions(start: Tensor, reset: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """Position of each token inside its document.

    Args:
        start: [B] int64, the position of the window's first token if no reset occurs.
        reset: [B, T] bool or None.
        length: T.

    Returns:
        positions [B, T] int64 and the position of the token after the window [B].
    """
    idx = torch.arange(length, device=start.device)
    pos = start[:, None] + idx
    if reset is not None:
        last = last_reset_index(reset)
        pos = torch.where(last >= 0, idx - last, pos)
    following = pos[:, -1] + 1 if length else start
    return pos, following


def prefix_sum(x: Tensor, initial_state: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Running sum over each position's prefix, restarted at resets.

    Exact: no sum before a document start is ever subtracted (``naive.naive_prefix_sum``, the
    reference, subtracts it). Eager calls longer than a chunk take the chunked form (``ops.chunked``:
    one mask matmul per chunk, the chunk totals carried across chunks); compiled and short calls a
    linear scan with gate 0 at a reset and 1 elsewhere (``ops.scan``), which the compiler fuses.

    Args:
        x: [B, T, E].
        initial_state: [B, E], the sum before position 0, or None for zero.
        reset: [B, T] bool or None.

    Returns:
        out [B, T, E] float32 (``out[t] = initial + sum_{tau<=t} x[tau]`` within a segment),
        and the final sum [B, E].
    """
    x = x.float()
    initial = initial_state.float() if initial_state is not None else x.new_zeros(x.shape[0], x.shape[2])
    batch, length, width = x.shape
    if length == 0:
        return x, initial
    reset = reset.to(device=x.device, dtype=torch.bool) if reset is not None else None
    size = chunked.CHUNK // 2  # plain sums: the mask matmul is the work
    if length > size and not torch.compiler.is_compiling():
        chunks = Chunks.cut(reset, batch, length, x.device, size)
        levels = x.new_zeros(chunks.chunk_doc.shape + (1, 1))
        carry = Carry(levels, from_initial=(chunks.chunk_doc == 0).to(x.dtype).view(levels.shape))
        return _ChunkedSum.apply(x, initial, chunks, carry)
    gate = x.new_ones(batch, length, 1) if reset is None else (~reset)[..., None].float()
    total = linear_scan(gate, x, initial)
    return total, total[:, -1].contiguous()


class _ChunkedSum(torch.autograd.Function):
    """``prefix_sum`` by ``chunked.scan_chunks``; the backward is its transpose."""

    @staticmethod
    def forward(ctx, x: Tensor, initial: Tensor, chunks: Chunks, carry: Carry):
        batch, length, width = x.shape
        ctx.chunks, ctx.carry = chunks, carry
        ctx.set_materialize_grads(False)
        with torch.autocast(x.device.type, enabled=False):
            sums, state = scan_chunks(chunks.split(x).unsqueeze(3), chunks, carry, initial.view(batch, 1, 1, width))
        return chunks.join(sums.squeeze(3)), state[:, -1, 0].contiguous()

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_final: Tensor | None):
        chunks, carry = ctx.chunks, ctx.carry
        batch, count, size = chunks.doc.shape
        with torch.autocast(chunks.mask.device.type, enabled=False):
            if d_out is None:
                grad = chunks.mask.new_zeros(batch, count, size, 1, d_final.shape[-1])
            else:
                grad = chunks.split(d_out, copy=True).unsqueeze(3)
            d_terms, d_initial = scan_chunks_backward(
                grad, d_final.unsqueeze(1) if d_final is not None else None, chunks, carry, ctx.needs_input_grad[1])
        return chunks.join(d_terms.squeeze(3)), d_initial.squeeze(1) if d_initial is not None else None, None, None
