"""Causal softmax attention inside documents: a sliding window with a KV cache, and full prefix.

Both ops mask by document: ``reset`` [B, T] marks the tokens where a new document starts, and
a query only sees keys of its own document. Tokens get document ids ``cumsum(reset)`` along the
window, so id 0 is the document that was open when the window began (continued from the cache).

``windowed_attention`` is sliding-window attention: the query at time t sees the keys at times
t-W+1 .. t (itself included: W keys). Its state is the cache of the W-1 tokens before the chunk,
the only ones a later query can still see, so the state has a fixed shape::

    k, v [B, H, W-1, D]  keys and values, oldest first
    seg  [B, W-1] int64  0 where the slot holds a token of the document open at the end of the
                         chunk, -1 where it is empty or holds an earlier document (never visible)

Queries are processed in blocks of C = min(W, T): block b holds the queries bC .. bC+C-1 and
reads the W-1+C keys before and inside it, so compute and memory grow as T * (W + C), not T^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_PAD_SEG = -2
"""Document id of the padding queries and keys that round T up to whole blocks: they see each
other only, so no softmax row is empty (an empty row would give NaN)."""


def document_ids(reset: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """[B, T] int64 document id of each token: the number of resets at or before it."""
    if reset is None:
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    return torch.cumsum(reset.to(device=device, dtype=torch.long), dim=1)


def empty_kv_cache(batch: int, n_heads: int, window: int, head_dim: int, device=None,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """The cache before any token: (k, v [B, H, W-1, D] zeros, seg [B, W-1] all -1)."""
    k = torch.zeros(batch, n_heads, window - 1, head_dim, device=device, dtype=dtype)
    seg = torch.full((batch, window - 1), -1, dtype=torch.long, device=device)
    return k, torch.zeros_like(k), seg


def windowed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    reset: Tensor | None = None,
    initial_state: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Sliding-window causal attention within documents, continuing a KV cache.

    Args:
        q, k, v: [B, H, T, D] queries, keys and values of the chunk's T tokens.
        window: W >= 1, the keys a query sees (itself included).
        reset: [B, T] bool or None; True where a new document starts.
        initial_state: the cache (k, v [B, H, W-1, D], seg [B, W-1] int64) of the tokens
            before the chunk, or None for no tokens (``empty_kv_cache``).

    Returns:
        out: [B, H, T, D] in the dtype of q, softmax(q k^T / sqrt(D)) v over the visible keys.
        final_state: the cache after the chunk, in the dtype of ``initial_state``; it carries
            the gradient to the chunk's keys and values.
    """
    batch, heads, length, dim = q.shape
    if initial_state is None:
        initial_state = empty_kv_cache(batch, heads, window, dim, q.device, q.dtype)
    cache_k, cache_v, cache_seg = initial_state
    if length == 0:
        return q, (cache_k, cache_v, cache_seg)
    past = window - 1
    keys = torch.cat([cache_k.to(k.dtype), k], dim=2)  # [B, H, W-1+T, D]
    values = torch.cat([cache_v.to(v.dtype), v], dim=2)
    seg = torch.cat([cache_seg, document_ids(reset, batch, length, q.device)], dim=1)  # [B, W-1+T]

    block = min(window, length)
    n_blocks = -(-length // block)
    pad = n_blocks * block - length
    pad_seg = seg.new_full((batch, pad), _PAD_SEG)
    q_all = F.pad(q, (0, 0, 0, pad))
    k_all = F.pad(keys, (0, 0, 0, pad))
    v_all = F.pad(values, (0, 0, 0, pad))
    seg_all = torch.cat([seg, pad_seg], dim=1)

    # block b of queries reads the keys with cache-relative index bC .. bC+C+W-2
    qb = q_all.reshape(batch, heads, n_blocks, block, dim)
    kb = k_all.unfold(2, block + past, block).transpose(-1, -2)  # [B, H, nb, C+W-1, D]
    vb = v_all.unfold(2, block + past, block).transpose(-1, -2)
    seg_q = seg_all[:, past:].reshape(batch, n_blocks, block)
    seg_k = seg_all.unfold(1, block + past, block)  # [B, nb, C+W-1]
    # query i of a block sits at key index i + W-1; it sees keys i .. i+W-1 of its block
    offset = torch.arange(block + past, device=q.device)[None, :] - torch.arange(block, device=q.device)[:, None]
    band = (offset >= 0) & (offset <= past)  # [C, C+W-1]
    mask = band & (seg_q[..., :, None] == seg_k[..., None, :])  # [B, nb, C, C+W-1]

    def blocks_first(x: Tensor) -> Tensor:  # [B, H, nb, L, D] -> [B*nb, H, L, D]
        return x.transpose(1, 2).reshape(batch * n_blocks, heads, x.shape[3], dim)

    out = F.scaled_dot_product_attention(
        blocks_first(qb), blocks_first(kb), blocks_first(vb), attn_mask=mask.reshape(batch * n_blocks, 1, block, -1))
    out = out.reshape(batch, n_blocks, heads, block, dim).transpose(1, 2).reshape(batch, heads, -1, dim)[:, :, :length]

    tail_seg = seg[:, length:]
    final_seg = torch.where(tail_seg == seg[:, -1:], 0, -1)
    # contiguous, as the empty cache is: a carried cache keeps one layout (no recompiles)
    final = (keys[:, :, length:].to(cache_k.dtype).contiguous(), values[:, :, length:].to(cache_v.dtype).contiguous(),
             final_seg)
    return out, final


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, reset: Tensor | None = None,
                     key_bias: Tensor | None = None) -> Tensor:
    """Causal attention over the whole prefix within documents, with an optional bias per key.

    Args:
        q, k, v: [B, H, T, D].
        reset: [B, T] bool or None; True where a new document starts.
        key_bias: [B, T] float or None, added to every score of that key; ``log(m)`` weighs a
            key as m identical copies of it would.

    Returns:
        out: [B, H, T, D] in the dtype of q.
    """
    batch, _, length, _ = q.shape
    seg = document_ids(reset, batch, length, q.device)
    idx = torch.arange(length, device=q.device)
    visible = (idx[None, :] <= idx[:, None]) & (seg[:, :, None] == seg[:, None, :])  # [B, T, T]
    if key_bias is None:
        mask = visible
    else:
        hidden = torch.full((), -math.inf, dtype=q.dtype, device=q.device)
        mask = torch.where(visible, key_bias[:, None, :].to(q.dtype), hidden)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
