"""The sliding-window transformer and Zephyra: float64 parity, the causal contract, counts, learning."""

from __future__ import annotations

import math
from pathlib import Path
import random

import pytest
import torch
import torch.nn.functional as F

from zarvan_dist import ModelConfig, build_model
from zarvan_dist.models.common import AdaptiveInput, sinusoidal
from zarvan_dist.models.transformer import TransformerLM
from numerics import rel_err, random_splits, run_chunked

ARCHS = ("transformer", "zephyra")
VOCAB, WINDOW = 61, 8


def small_config(arch: str, **overrides) -> ModelConfig:
    fields = dict(arch=arch, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, attn_window=WINDOW)
    if arch == "zephyra":
        fields.update(embedding="adaptive", cutoffs=[8, 24])
    fields.update(overrides)
    return ModelConfig(**fields)


def reference_logits(model: TransformerLM, ids: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """Float64 statement of the model, one query at a time: pre-norm blocks, window W, documents."""
    cfg = model.config
    e, h, w = cfg.d_model, cfg.n_heads, cfg.attn_window
    d = e // h
    batch, length = ids.shape
    doc = torch.cumsum(doc_start.long(), 1)
    pos = torch.zeros_like(ids)
    for t in range(1, length):
        pos[:, t] = torch.where(doc_start[:, t], 0, pos[:, t - 1] + 1)

    def ln(x, m):
        return F.layer_norm(x, (e,), m.weight.double(), m.bias.double(), 1e-5)

    def lin(x, m):
        return x @ m.weight.double().T + (m.bias.double() if m.bias is not None else 0.0)

    x = model.embed(ids) * math.sqrt(e) + sinusoidal(pos, e).double()
    for block in model.blocks:
        qkv = lin(ln(x, block.attn_norm), block.attn.qkv).view(batch, length, 3, h, d)
        att = torch.zeros(batch, length, h, d, dtype=torch.float64)
        for b in range(batch):
            for t in range(length):
                keys = [s for s in range(max(0, t - w + 1), t + 1) if doc[b, s] == doc[b, t]]
                scores = torch.einsum("hd,shd->hs", qkv[b, t, 0], qkv[b, keys, 1]) / math.sqrt(d)
                att[b, t] = torch.einsum("hs,shd->hd", torch.softmax(scores, -1), qkv[b, keys, 2])
        x = x + lin(att.reshape(batch, length, e), block.attn.out)
        hidden = F.gelu(lin(ln(x, block.ffn_norm), block.ffn[0]))
        x = x + lin(hidden, block.ffn[2])
    return lin(ln(x, model.norm), model.head)


def random_model(arch: str) -> TransformerLM:
    model = build_model(small_config(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random, not the init, so every term matters
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_model_matches_float64_statement(arch):
    model = random_model(arch)
    ids = torch.randint(0, VOCAB, (2, 21))
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[1, 9] = True
    with torch.no_grad():
        ref = reference_logits(model.double(), ids, doc_start)
        assert rel_err(model(ids, doc_start=doc_start).logits, ref) <= 1e-10
        assert rel_err(model.float()(ids, doc_start=doc_start).logits, ref) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("length", [WINDOW - 3, 5 * WINDOW + 3])
def test_streaming_equals_one_pass(arch, length):
    model = random_model(arch)
    ids = torch.randint(0, VOCAB, (3, length))
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[1, length // 2] = doc_start[2, 0] = doc_start[2, length - 2] = True
    full = model(ids, doc_start=doc_start)
    for seed in range(3):
        logits, state = run_chunked(model, ids, doc_start, random_splits(length, random.Random(seed)), detach=True)
        assert rel_err(logits, full.logits) <= 1e-5
        assert state.keys() == full.state.keys()
        for name in state.keys():
            assert torch.allclose(state[name], full.state[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("length", [WINDOW - 2, 3 * WINDOW + 1])
def test_streaming_gradients_match_with_attached_state(arch, length):
    model = random_model(arch)
    ids = torch.randint(0, VOCAB, (2, length))
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    doc_start[0, length // 3] = True
    weights = torch.randn(2, length, VOCAB)

    def grads(logits):
        model.zero_grad()
        (logits * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full = grads(model(ids, doc_start=doc_start).logits)
    chunked = grads(run_chunked(model, ids, doc_start, random_splits(length, random.Random(1)), detach=False)[0])
    assert full.keys() == chunked.keys() == {n for n, _ in model.named_parameters()}
    for name in full:
        assert rel_err(chunked[name], full[name]) <= 1e-5, name


@pytest.mark.parametrize("arch", ARCHS)
def test_no_logit_reads_the_future(arch):
    model = random_model(arch)
    ids = torch.randint(0, VOCAB, (2, 3 * WINDOW))
    base = model(ids).logits
    for t in (0, 5, WINDOW, 3 * WINDOW - 1):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits = model(changed).logits
        assert torch.equal(logits[:, :t], base[:, :t]), f"a position before {t} changed"
        assert not torch.equal(logits[:, t], base[:, t])
    # a token reaches W-1 positions further per layer, and no further
    reach = 2 + model.config.n_layers * (WINDOW - 1)
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % VOCAB
    logits = model(changed).logits
    assert not torch.equal(logits[:, reach], base[:, reach])
    assert torch.equal(logits[:, reach + 1:], base[:, reach + 1:])


def hand_count(cfg: ModelConfig) -> tuple[int, int]:
    """(embedding tables, everything else) of a transformer/zephyra config, counted by hand."""
    e, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    block = (2 * e                      # attention LayerNorm
             + (3 * e * e + 3 * e)      # q, k, v projections
             + (e * e + e)              # output projection
             + 2 * e                    # FFN LayerNorm
             + (e * f + f) + (f * e + e))
    rest = cfg.n_layers * block + 2 * e + v * e  # final LayerNorm and untied head
    if cfg.embedding == "adaptive":
        edges = [0, *cfg.cutoffs, v]
        widths = [int(e // cfg.adaptive_factor ** i) for i in range(len(edges) - 1)]
        tables = sum((hi - lo) * w for lo, hi, w in zip(edges, edges[1:], widths))
        return tables, rest + sum(w * e for w in widths)  # band projections multiply
    return v * e, rest


@pytest.mark.parametrize("arch", ARCHS)
def test_params_and_flops_hand_count(arch):
    cfg = small_config(arch)
    model = build_model(cfg)
    tables, rest = hand_count(cfg)
    if arch == "zephyra":
        assert isinstance(model.embed, AdaptiveInput)
        assert tables == 8 * 32 + 16 * 8 + 37 * 2  # bands of width 32, 32/4, 32/16
    assert model.num_params() == tables + rest
    assert model.num_params(exclude_embedding=True) == rest
    e, layers = cfg.d_model, cfg.n_layers
    for seq_len in (WINDOW - 3, WINDOW, 100):
        attention = 12 * layers * e * min(seq_len, WINDOW)
        assert model.flops_per_token(seq_len) == 6 * rest + attention


@pytest.mark.parametrize("arch", ARCHS)
def test_named_debug_size_hand_count(arch):
    cfg = ModelConfig.from_yaml(Path(__file__).parents[2] / "configs" / "models" / f"{arch}-debug.yaml")
    tables, rest = hand_count(cfg)
    model = build_model(cfg)
    assert model.num_params() == tables + rest
    assert model.num_params(exclude_embedding=True) == rest
    attention = 12 * cfg.n_layers * cfg.d_model * min(2048, cfg.attn_window)
    assert model.flops_per_token(2048) == 6 * rest + attention
