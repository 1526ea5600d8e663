"""Windowed and prefix attention against naive float64 loops over queries."""

from __future__ import annotations

import math
import random

import pytest
import torch

from zarvan_dist.ops.attention import empty_kv_cache, prefix_attention, windowed_attention
from numerics import rel_err, random_splits


def naive_attention(q, k, v, reset, window=None, key_bias=None):
    """Float64 statement: query t sees key s iff t-W < s <= t and both are in one document."""
    batch, heads, length, dim = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for b in range(batch):
        doc = [0] * length
        for t in range(length):
            doc[t] = (doc[t - 1] if t else 0) + int(reset[b, t])
        for t in range(length):
            keys = [s for s in range(length) if s <= t and doc[s] == doc[t] and (window is None or t - s < window)]
            scores = q[b, :, t:t + 1] @ k[b, :, keys].transpose(-1, -2) / math.sqrt(dim)  # [H, 1, S]
            if key_bias is not None:
                scores = scores + key_bias[b, keys].double()
            out[b, :, t] = (torch.softmax(scores, -1) @ v[b, :, keys])[:, 0]
    return out


def chunked(q, k, v, reset, window, sizes):
    """The op over consecutive chunks with the cache carried; outputs concatenated."""
    state, outs, start = None, [], 0
    for size in sizes:
        sl = slice(start, start + size)
        out, state = windowed_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], window, reset[:, sl], state)
        assert state[0].shape[2] == state[2].shape[1] == window - 1  # the cache never changes shape
        outs.append(out)
        start += size
    return torch.cat(outs, 2), state


def random_inputs(batch, heads, length, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, dtype=dtype) for _ in range(3))
    reset = torch.rand(batch, length, generator=gen) < 0.1
    reset[0, 0] = True  # a reset on the very first token is the same as none
    return q, k, v, reset


@pytest.mark.parametrize("window", [1, 2, 8])
@pytest.mark.parametrize("length", [5, 37])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_matches_reference_outputs_and_final_state(window, length, dtype, tol):
    q, k, v, reset = random_inputs(2, 3, length, 4, dtype, seed=window * 100 + length)
    ref = naive_attention(q, k, v, reset, window)
    full, full_state = windowed_attention(q, k, v, window, reset)
    assert full.dtype == dtype and rel_err(full, ref) <= tol
    for seed in range(3):
        out, state = chunked(q, k, v, reset, window, random_splits(length, random.Random(seed)))
        assert rel_err(out, ref) <= tol
        for a, b in zip(state, full_state):
            assert torch.equal(a, b)
    # the cache holds the last W-1 tokens; seg marks those of the document still open
    ck, cv, seg = full_state
    held = min(window - 1, length)
    if held:
        assert torch.equal(ck[:, :, window - 1 - held:], k[:, :, length - held:])
        assert torch.equal(cv[:, :, window - 1 - held:], v[:, :, length - held:])
    doc = torch.cumsum(reset.long(), 1)
    expected = torch.full((2, window - 1), -1)
    expected[:, window - 1 - held:] = torch.where(doc[:, length - held:] == doc[:, -1:], 0, -1)
    assert torch.equal(seg, expected)


@pytest.mark.parametrize("window", [3, 8])
def test_gradients_through_the_carried_cache_match_reference(window):
    q, k, v, reset = random_inputs(2, 2, 23, 4, torch.float64, seed=window)
    weights = torch.randn(2, 2, 23, 4, dtype=torch.float64)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (fn(*leaves) * weights).sum().backward()
        return [x.grad for x in leaves]

    ref = grads(lambda a, b, c: naive_attention(a, b, c, reset, window))
    got = grads(lambda a, b, c: chunked(a, b, c, reset, window, random_splits(23, random.Random(7)))[0])
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-12


def test_reset_at_chunk_start_hides_the_cache_and_empty_chunk_keeps_it():
    q, k, v, _ = random_inputs(1, 2, 12, 4, torch.float64, seed=3)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    _, state = windowed_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], 8, reset[:, :7])
    start = torch.zeros(1, 5, dtype=torch.bool)
    start[0, 0] = True
    out, _ = windowed_attention(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], 8, start, state)
    alone, _ = windowed_attention(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], 8, None)
    assert rel_err(out, alone) <= 1e-12
    empty, same = windowed_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], 8, reset[:, :0], state)
    assert empty.shape == (1, 2, 0, 4) and all(torch.equal(a, b) for a, b in zip(same, state))


def test_cache_keeps_its_dtype_under_bfloat16_inputs():
    q, k, v, reset = random_inputs(2, 2, 9, 4, torch.bfloat16, seed=5)
    cache = empty_kv_cache(2, 2, 8, 4)
    out, (ck, cv, seg) = windowed_attention(q, k, v, 8, reset, cache)
    assert out.dtype == torch.bfloat16 and ck.dtype == cv.dtype == torch.float32 and seg.dtype == torch.long
    assert rel_err(out, naive_attention(q, k, v, reset, 8)) <= 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_prefix_attention_with_key_bias_matches_reference(dtype, tol):
    q, k, v, reset = random_inputs(2, 3, 19, 4, dtype, seed=11)
    bias = torch.where(torch.rand(2, 19) < 0.4, math.log(2.0), 0.0).to(dtype)
    assert rel_err(prefix_attention(q, k, v, reset), naive_attention(q, k, v, reset)) <= tol
    assert rel_err(prefix_attention(q, k, v, reset, bias), naive_attention(q, k, v, reset, key_bias=bias)) <= tol


def test_key_bias_log2_equals_a_duplicated_key():
    """Weighing a key by log 2 is attention over the keys with that key present twice."""
    q, k, v, _ = random_inputs(1, 1, 6, 4, torch.float64, seed=2)
    bias = torch.zeros(1, 6, dtype=torch.float64)
    bias[0, 2] = math.log(2.0)
    weighted = prefix_attention(q, k, v, None, bias)[:, :, -1]
    keys = torch.cat([k, k[:, :, 2:3]], 2)
    values = torch.cat([v, v[:, :, 2:3]], 2)
    dup = torch.softmax(q[:, :, -1:] @ keys.transpose(-1, -2) / 2.0, -1) @ values
    assert rel_err(weighted, dup[:, :, 0]) <= 1e-12
