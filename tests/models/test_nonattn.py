"""The non-attention LM: float64 parity, the causal contract, retrieval rules and accounting."""

from __future__ import annotations

from pathlib import Path

import math

import pytest
import torch
import torch.nn.functional as F

from zarvan_dist.models import ModelConfig, build_model
from zarvan_dist.models.common import sinusoidal
from zarvan_dist.models.nonattn import NonAttnLM
from numerics import rel_err

VOCAB = 37
C = 4  # supervisor chunk


def make_model(seed: int = 0, **overrides) -> NonAttnLM:
    fields = dict(arch="nonattn", vocab_size=VOCAB, d_model=32, n_layers=2, supervisor_chunk=C, conv_kernel=4,
                  dilations=[1, 2, 4], retrieval_len=3, init_std=0.1)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**fields))
    assert isinstance(model, NonAttnLM)
    return model.eval()


def random_batch(batch: int, length: int, seed: int, reset_prob: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    doc_start = torch.rand(batch, length, generator=g) < reset_prob
    return ids, doc_start


def random_neighbours(batch: int, length: int, seed: int, k: int = 2, m: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, -(-length // C), k, m), generator=g)


# an independent, token-by-token float64 statement of the model


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def layer_norm(x, weight, bias, eps=1e-5):
    mu = x.mean()
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean() + eps) * weight + bias


def conv_at(frames, weight, bias, dilation):
    """Output for the newest of ``frames`` (the document's inputs so far): taps before the start read 0."""
    out = bias.clone()
    kernel = weight.shape[-1]
    for j in range(kernel):
        lag = (kernel - 1 - j) * dilation
        if lag < len(frames):
            f = frames[-1 - lag]
            out = out + (weight[:, 0, j] * f if weight.shape[1] == 1 else weight[:, :, j] @ f)
    return out


def gru_cell(x, h, p):
    gi = p["supervisor.cell.weight_ih"] @ x + p["supervisor.cell.bias_ih"]
    gh = p["supervisor.cell.weight_hh"] @ h + p["supervisor.cell.bias_hh"]
    ir, iz, i_n = gi.chunk(3)
    hr, hz, h_n = gh.chunk(3)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def reference_logits(model, ids, doc_start, neighbours=None):
    """Sequential float64 model: per document, conv histories, chunk means and a GRU."""
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    batch, length = ids.shape
    e = cfg.d_model
    logits = torch.zeros(batch, length, cfg.vocab_size, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            if t == 0 or doc_start[b, t]:
                pos, doc_begin = 0, t
                frames = [([], []) for _ in range(cfg.n_layers)]
                g = torch.zeros(e, dtype=torch.float64)
                open_chunk = []
            x = p["embed.weight"][ids[b, t]] * math.sqrt(e) + sinusoidal(torch.tensor(pos), e).double()
            for i in range(cfg.n_layers):
                q = f"blocks.{i}."
                frames[i][0].append(x)
                s4 = conv_at(frames[i][0], p[q + "s4_conv.weight"], p[q + "s4_conv.bias"], 1)
                x = x + p[q + "pointwise.weight"] @ gelu(s4) + p[q + "pointwise.bias"]
                frames[i][1].append(x)
                x = x + sum(gelu(conv_at(frames[i][1], p[q + f"multires.{n}.weight"], p[q + f"multires.{n}.bias"], d))
                            for n, d in enumerate(cfg.dilations))
            read = p["supervisor.read.weight"] @ g if pos >= C else torch.zeros(e, dtype=torch.float64)
            logits[b, t] = p["head.weight"] @ layer_norm(x + read, p["norm.weight"], p["norm.bias"])
            open_chunk.append(x)
            if len(open_chunk) == C:
                r = torch.stack(open_chunk).mean(0)
                c = (t + 1) // C - 1  # latest window chunk that has ended
                if neighbours is not None and c >= 0 and c * C >= doc_begin:
                    found = neighbours[b, c].flatten()
                    found = found[found >= 0]
                    if len(found):
                        pooled = p["embed.weight"][found].mean(0)
                        both = torch.cat([layer_norm(r, p["supervisor.fuse_norm_chunk.weight"],
                                                     p["supervisor.fuse_norm_chunk.bias"]),
                                          layer_norm(pooled, p["supervisor.fuse_norm_found.weight"],
                                                     p["supervisor.fuse_norm_found.bias"])])
                        fused = p["supervisor.fuse.weight"] @ both + p["supervisor.fuse.bias"]
                        r = r + torch.sigmoid(p["supervisor.gate"]) * torch.tanh(fused)
                g = gru_cell(r, g, p)
                open_chunk = []
            pos += 1
    return logits


@pytest.mark.parametrize("retrieval", [False, True])
def test_matches_float64_reference(retrieval):
    model = make_model(retrieval=retrieval).double()
    ids, doc_start = random_batch(3, 23, seed=1, reset_prob=0.12)
    neighbours = random_neighbours(3, 23, seed=2) if retrieval else None
    if retrieval:
        neighbours[0, 2, 0] = -1  # padding inside a neighbour list
        neighbours[1, 3] = -1  # a chunk with no neighbour at all
    state = model.init_state(3).to(torch.float64)
    logits = model(ids, state, doc_start, neighbours=neighbours).logits
    torch.testing.assert_close(logits, reference_logits(model, ids, doc_start, neighbours), rtol=1e-9, atol=1e-10)


# the causal contract


def test_streaming_matches_one_forward_with_gradients():
    model = make_model()
    ids, doc_start = random_batch(2, 41, seed=3)
    full = model(ids, doc_start=doc_start).logits
    g = torch.Generator().manual_seed(4)
    sizes = [1, 1, 1]  # 1-token steps at the start, then random pieces with more 1-token steps
    while sum(sizes) < ids.shape[1]:
        sizes.append(min(int(torch.randint(1, 8, (1,), generator=g)), ids.shape[1] - sum(sizes)))
    pieces, state, start = [], model.init_state(2), 0
    for size in sizes:
        out = model(ids[:, start:start + size], state, doc_start[:, start:start + size])
        pieces.append(out.logits)
        state = out.state  # not detached: gradients flow across the pieces
        start += size
    streamed = torch.cat(pieces, 1)
    assert rel_err(streamed, full) <= 1e-5

    weight = torch.randn(full.shape, generator=g)
    grads_full = torch.autograd.grad((full * weight).sum(), list(model.parameters()))
    grads_streamed = torch.autograd.grad((streamed * weight).sum(), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads_streamed, grads_full):
        assert rel_err(a, b) <= 1e-5, name


def test_changing_a_token_changes_no_earlier_logit():
    model = make_model()
    ids, doc_start = random_batch(2, 19, seed=5)
    base = model(ids, doc_start=doc_start).logits
    for t in (0, 3, 4, 9, 18):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits = model(changed, doc_start=doc_start).logits
        assert torch.equal(logits[:, :t], base[:, :t]), t
        assert not torch.allclose(logits[:, t], base[:, t]), t


def test_document_reset_gives_the_document_alone():
    model = make_model()
    ids, _ = random_batch(1, 30, seed=6, reset_prob=0.0)
    a_len = 11
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[:, a_len] = True
    alone = model(ids[:, a_len:])

    packed = model(ids, doc_start=doc_start)
    assert rel_err(packed.logits[:, a_len:], alone.logits) <= 1e-5

    # across calls: A leaves a carried state, B starts the next call
    after_a = model(ids[:, :a_len]).state
    b = model(ids[:, a_len:], after_a, doc_start[:, a_len:])
    assert rel_err(b.logits, alone.logits) <= 1e-5
    # the state after B holds nothing of A, also while B has not closed a supervisor chunk yet
    short = model(ids[:, :a_len + 2], doc_start=doc_start[:, :a_len + 2]).state
    for got, want in ((b.state, alone.state), (packed.state, alone.state), (short, model(ids[:, a_len:a_len + 2]).state)):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


# retrieval


def test_neighbours_reach_only_later_window_chunks():
    model = make_model(retrieval=True)
    ids, doc_start = random_batch(2, 22, seed=7, reset_prob=0.08)
    neighbours = random_neighbours(2, 22, seed=8)
    # a carried prefix of 3 tokens, so document chunks are not aligned with window chunks
    prefix = model(random_batch(2, 3, seed=9, reset_prob=0.0)[0]).state
    for state in (None, prefix):
        base = model(ids, state, doc_start, neighbours=neighbours).logits
        later_changed = False
        for c in range(neighbours.shape[1]):
            changed = neighbours.clone()
            changed[:, c] = (changed[:, c] + 5) % VOCAB
            logits = model(ids, state, doc_start, neighbours=changed).logits
            assert torch.equal(logits[:, :(c + 1) * C], base[:, :(c + 1) * C]), c
            later_changed |= not torch.allclose(logits, base)
        assert later_changed


def test_no_neighbours_is_the_model_without_retrieval():
    with_retrieval = make_model(retrieval=True)
    plain = make_model(seed=1)
    missing, _ = plain.load_state_dict(with_retrieval.state_dict(), strict=False)
    assert not missing
    ids, doc_start = random_batch(2, 17, seed=10)
    want = plain(ids, doc_start=doc_start).logits
    assert torch.equal(with_retrieval(ids, doc_start=doc_start).logits, want)
    padding = torch.full((2, 5, 2, 3), -1)
    assert torch.equal(with_retrieval(ids, doc_start=doc_start, neighbours=padding).logits, want)


def test_rejects_bad_neighbours():
    ids = torch.zeros(2, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="without retrieval"):
        make_model()(ids, neighbours=torch.zeros(2, 3, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="is not"):
        make_model(retrieval=True)(ids, neighbours=torch.zeros(2, 2, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="is not"):
        make_model(retrieval=True)(ids, neighbours=torch.zeros(2, 3, 1, 4, dtype=torch.long))


# accounting and learning


@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_param_and_flop_count(retrieval, tie):
    v, e, layers, k, n_dil = VOCAB, 32, 2, 4, 3
    model = make_model(retrieval=retrieval, tie_embeddings=tie)
    per_layer = (e * k + e) + (e * e + e) + n_dil * (3 * e * e + e)  # S4 conv, W_pw, dilated k=3 convs
    supervisor = (6 * e * e + 6 * e) + e * e  # GRU cell (3 gates, input and hidden side), W_read
    if retrieval:
        supervisor += (2 * e * e + e) + e + 2 * 2 * e  # W_f, the gate, the two LayerNorms of its inputs
    body = layers * per_layer + supervisor + 2 * e  # + final LayerNorm
    head = v * e
    assert model.num_params() == v * e + body + (0 if tie else head)
    assert model.num_params(exclude_embedding=True) == body + (0 if tie else head)
    # 6 FLOPs per matmul parameter per token; the supervisor runs once per chunk of C tokens
    want = 6 * (layers * per_layer + 2 * e + head + supervisor / C)
    assert model.flops_per_token(256) == pytest.approx(want)


def test_learns_a_periodic_sequence(one_thread):
    # each row repeats a random 3-token pattern: after the first period every token is determined
    # by the token three back, which only the convolutions can see
    torch.manual_seed(0)
    model = make_model(init_std=0.02).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        pattern = torch.randint(0, VOCAB, (16, 3))
        ids = pattern.repeat(1, 8)
        logits = model(ids).logits[:, 2:-1]
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 3:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert start > 3.0 and end < 0.5, (start, end)


def test_named_debug_size_hand_count():
    cfg = ModelConfig.from_yaml(Path(__file__).parents[2] / "configs" / "models" / "nonattn-debug.yaml")
    v, e, layers, k, c = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.conv_kernel, cfg.supervisor_chunk
    per_layer = (e * k + e) + (e * e + e) + len(cfg.dilations) * (3 * e * e + e)
    supervisor = (6 * e * e + 6 * e) + e * e
    model = build_model(cfg)
    assert model.num_params() == v * e + layers * per_layer + supervisor + 2 * e + v * e
    assert model.flops_per_token(2048) == pytest.approx(6 * (layers * per_layer + 2 * e + v * e + supervisor / c))
