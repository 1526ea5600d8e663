"""Document segments inside a window: positions since the document start, segmented sums.

``reset`` [B, T] bool marks the tokens where a new document starts (a BOS); everything a
causal op carries is dropped before such a token.
"""

from __future__ import annotations

import torch
from torch import Tensor

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

    A linear scan with gate 0 at a reset and 1 elsewhere (``zarvan_dist.ops.scan``): exact, no
    sum before a document start is ever subtracted (``naive.naive_prefix_sum`` is the reference).

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
    if x.shape[1] == 0:
        return x, initial
    if reset is None:
        gate = x.new_ones(x.shape[0], x.shape[1], 1)
    else:
        gate = (~reset.to(device=x.device, dtype=torch.bool))[..., None].float()
    total = linear_scan(gate, x, initial)
    return total, total[:, -1].contiguous()
