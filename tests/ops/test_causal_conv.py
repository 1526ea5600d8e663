"""causal_conv1d against a naive float64 loop over tokens and taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zarvan_dist.ops.causal_conv import causal_conv1d


def naive_causal_conv(x, weight, bias, dilation, initial_state, reset):
    """out[b, t] = bias + sum_j W_j frame(t - (k-1-j) d), frames before the last reset read as 0."""
    batch, length, channels = x.shape
    out_channels, per_group, kernel = weight.shape
    span = (kernel - 1) * dilation
    history = torch.cat([initial_state, x], dim=1)  # window index p is history[span + p]
    out = torch.zeros(batch, length, out_channels, dtype=x.dtype)
    starts = []
    for b in range(batch):
        start = -span  # no reset yet: the whole tail is readable
        for t in range(length):
            if reset[b, t]:
                start = t
            acc = bias.clone()
            for j in range(kernel):
                p = t - (kernel - 1 - j) * dilation
                if p < start:
                    continue
                frame = history[b, span + p]
                acc = acc + (weight[:, 0, j] * frame if per_group == 1 and channels > 1 else weight[:, :, j] @ frame)
            out[b, t] = acc
        starts.append(start)
    final = history[:, length:].clone()
    for b in range(batch):
        for i, p in enumerate(range(length - span, length)):
            if p < starts[b]:
                final[b, i] = 0
    return out, final


def make_inputs(batch, length, channels, out_channels, kernel, dilation, depthwise, reset_prob, seed):
    g = torch.Generator().manual_seed(seed)
    span = (kernel - 1) * dilation
    x = torch.randn(batch, length, channels, generator=g, dtype=torch.float64)
    weight = torch.randn(channels if depthwise else out_channels, 1 if depthwise else channels, kernel,
                         generator=g, dtype=torch.float64)
    bias = torch.randn(weight.shape[0], generator=g, dtype=torch.float64)
    tail = torch.randn(batch, span, channels, generator=g, dtype=torch.float64)
    reset = torch.rand(batch, length, generator=g) < reset_prob
    return x, weight, bias, tail, reset


CASES = [
    # (channels, out_channels, kernel, dilation, depthwise)
    (5, 5, 4, 1, True),
    (5, 5, 3, 3, True),
    (4, 6, 3, 2, False),
    (3, 3, 1, 1, False),
    (1, 1, 4, 2, True),
]


@pytest.mark.parametrize("channels,out_channels,kernel,dilation,depthwise", CASES)
@pytest.mark.parametrize("reset_prob", [0.0, 0.15, 0.5])
def test_matches_naive_loop_with_gradients(channels, out_channels, kernel, dilation, depthwise, reset_prob):
    x, weight, bias, tail, reset = make_inputs(3, 17, channels, out_channels, kernel, dilation, depthwise,
                                               reset_prob, seed=kernel * 10 + dilation)
    leaves = [t.requires_grad_() for t in (x, weight, bias, tail)]
    out, final = causal_conv1d(x, weight, bias, dilation, tail, reset)
    ref_out, ref_final = naive_causal_conv(x, weight, bias, dilation, tail, reset)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=1e-12, atol=1e-12)

    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_final = torch.randn(final.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w_out).sum() + (final * w_final).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * w_out).sum() + (ref_final * w_final).sum(), leaves)
    for name, got, want in zip(("x", "weight", "bias", "initial_state"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


def test_tap_order_is_conv1d_on_left_padded_input():
    x, weight, bias, _, _ = make_inputs(2, 11, 4, 6, 3, 2, False, 0.0, seed=3)
    out, _ = causal_conv1d(x, weight, bias, dilation=2)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (4, 0)), weight, bias, dilation=2).transpose(1, 2)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("depthwise", [True, False])
def test_chunked_calls_match_one_call(depthwise):
    x, weight, bias, tail, reset = make_inputs(2, 40, 4, 4, 4, 2, depthwise, 0.1, seed=7)
    full, full_final = causal_conv1d(x, weight, bias, 2, tail, reset)
    g = torch.Generator().manual_seed(11)
    pieces, state, start = [], tail, 0
    while start < x.shape[1]:
        size = int(torch.randint(1, 9, (1,), generator=g))
        stop = min(start + size, x.shape[1])
        out, state = causal_conv1d(x[:, start:stop], weight, bias, 2, state, reset[:, start:stop])
        pieces.append(out)
        start = stop
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, full_final, rtol=1e-12, atol=1e-12)


def test_document_after_reset_matches_document_alone():
    x, weight, bias, tail, _ = make_inputs(1, 20, 3, 3, 4, 3, True, 0.0, seed=5)
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 12] = True
    packed, packed_final = causal_conv1d(x, weight, bias, 3, tail, reset)
    alone, alone_final = causal_conv1d(x[:, 12:], weight, bias, 3)
    torch.testing.assert_close(packed[:, 12:], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed_final, alone_final, rtol=1e-12, atol=1e-12)


def test_rejects_mismatched_shapes():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="neither"):
        causal_conv1d(x, torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, torch.randn(4, 1, 3), initial_state=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="reset"):
        causal_conv1d(x, torch.randn(4, 1, 3), reset=torch.zeros(2, 4, dtype=torch.bool))
