"""Left-causal 1-D convolution over [B, T, C] with a carried input tail and document resets.

For a kernel of length k and dilation d, with weight in ``nn.Conv1d`` layout (tap j is applied
to the frame (k-1-j)*d steps back, so ``weight[..., k-1]`` reads the current frame)::

    out[t] = bias + sum_{j=0}^{k-1} W_j x[t - (k-1-j) d]

Frames before the window come from the carried tail (the last (k-1)*d input frames), and a
frame that lies before the last reset at or before t reads as zero, so a document run inside
a packed row gives the same outputs as the document run alone from a zero tail.

Chunk-parallel: one shifted, masked multiply-add per tap (a loop over the k taps, never over
tokens). A depthwise tap multiplies a view of the padded input, so autograd keeps one copy of
the input, not k; a full convolution projects every frame to all k taps in one matmul and sums
the shifted slices of the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zarvan_dist.ops.segments import last_reset_index


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    dilation: int = 1,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal convolution of ``x`` along time, continuing from ``initial_state``.

    Args:
        x: [B, T, Cin].
        weight: [Cout, Cin, k] (full convolution) or [Cin, 1, k] (depthwise: channel c is
            convolved with its own kernel ``weight[c, 0]``); ``nn.Conv1d`` tap order.
        bias: [Cout] or None.
        dilation: spacing d between taps (a positive int).
        initial_state: [B, (k-1)*d, Cin], the input frames just before position 0 (oldest
            first), or None for zeros (an empty history).
        reset: [B, T] bool or None; True at t means a document starts at t: no token at or
            after t reads a frame before t.

    Returns:
        out: [B, T, Cout] (dtype of the multiply: ``x``'s, or the autocast dtype).
        final_state: [B, (k-1)*d, Cin], the last (k-1)*d frames of ``initial_state`` followed
            by ``x``, with frames before the row's last reset zeroed (they are never read again).
    """
    batch, length, channels = x.shape
    out_channels, per_group, kernel = weight.shape
    if per_group == channels:
        depthwise = False
    elif per_group == 1 and out_channels == channels:
        depthwise = True
    else:
        raise ValueError(f"weight {tuple(weight.shape)} is neither [Cout, {channels}, k] nor [{channels}, 1, k]")
    if dilation < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")
    span = (kernel - 1) * dilation
    if initial_state is None:
        initial_state = x.new_zeros(batch, span, channels)
    elif initial_state.shape != (batch, span, channels):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} is not [{batch}, {span}, {channels}]")
    padded = torch.cat([initial_state.to(x.dtype), x], dim=1)  # [B, span + T, Cin]

    idx = torch.arange(length, device=x.device)
    if reset is not None:
        if reset.shape != (batch, length):
            raise ValueError(f"reset {tuple(reset.shape)} is not [{batch}, {length}]")
        last = last_reset_index(reset.to(torch.bool))
        # how many steps back token t may read: back to its document start, or the whole tail
        reach = torch.where(last >= 0, idx - last, torch.full_like(last, span))

    if not depthwise:
        # [B, span + T, k, Cout]: every frame through every tap; taps are then shifted and summed
        projected = F.linear(padded, weight.permute(2, 0, 1).reshape(kernel * out_channels, channels))
        projected = projected.unflatten(-1, (kernel, out_channels))
    out = None
    for j in range(kernel):
        lag = (kernel - 1 - j) * dilation
        if depthwise:
            term = padded[:, span - lag: span - lag + length] * weight[:, 0, j]
        else:
            term = projected[:, span - lag: span - lag + length, j]
        if reset is not None and lag:
            term = term * (reach >= lag)[..., None].to(term.dtype)
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias

    final_state = padded[:, length:]
    if reset is not None and span and length:
        # window index of each carried frame; keep it only if it is not before the last reset
        frame = torch.arange(length - span, length, device=x.device)
        start = torch.where(last[:, -1] >= 0, last[:, -1], -span)
        final_state = final_state * (frame[None] >= start[:, None])[..., None].to(final_state.dtype)
    # contiguous, as the empty state is: a carried state keeps one layout (no recompiles)
    return out, final_state.contiguous()
