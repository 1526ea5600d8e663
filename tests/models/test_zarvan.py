"""Zarvan v2 against independent float64 statements of its math (docs/models.md, "Zarvan v2 block")."""

from __future__ import annotations

import math

import pytest
import torch

from zarvan_dist import ModelConfig, build_model
from zarvan_dist.models.zarvan import ZarvanBlock, ZarvanForSequenceClassification
from numerics import rel_err


def weights(block: ZarvanBlock) -> dict[str, torch.Tensor]:
    """The block's parameters in float64, named as in the published math."""
    e = block.d_model
    w, b = block.in_proj.weight.double(), block.in_proj.bias.double()
    names = ["W_s", "W_v", "W_v2", "W_g", "W_v3"]
    p = {}
    for i, name in enumerate(names):
        p[name], p[name + "_b"] = w[i * e:(i + 1) * e], b[i * e:(i + 1) * e]
    p["w_u"], p["w_u_b"] = w[5 * e:5 * e + 1], b[5 * e:5 * e + 1]
    p["W_gate"], p["W_gate_b"] = w[5 * e + 1:], b[5 * e + 1:]
    for name, mod in [("W_in", block.adapter), ("W_comb", block.holistic_out), ("W_a", block.angle),
                      ("W_o", block.sequential_out), ("F1", block.ffn[0]), ("F2", block.ffn[2])]:
        p[name], p[name + "_b"] = mod.weight.double(), mod.bias.double()
    for name, mod in [("ln_in", block.adapter_norm), ("ln_a", block.angle_norm), ("ln_m", block.norm)]:
        p[name], p[name + "_b"] = mod.weight.double(), mod.bias.double()
    return p


def lin(x, p, name):
    return x @ p[name].T + p[name + "_b"]


def ln(x, p, name):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * p[name] + p[name + "_b"]


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def block_tail(x, a, q_h, q_a, c, n_norm, p):
    """Sequential extractor from its running sum c, the gate, the mix and the residual FFN."""
    omega = math.pi * ln(lin(c / n_norm, p, "W_a"), p, "ln_a")
    q_s = lin(torch.cat([torch.cos(omega), torch.sin(omega)], -1), p, "W_o")
    g = lin(a, p, "W_gate")
    g = g * torch.sigmoid(g)
    m = g[..., 0:1] * q_h + g[..., 1:2] * q_a + g[..., 2:3] * q_s
    return x + lin(gelu(lin(ln(m, p, "ln_m"), p, "F1")), p, "F2")


def published_block(x, p):
    """The published bidirectional block: pooling over the whole sequence, N = T."""
    a = ln(gelu(lin(x, p, "W_in")), p, "ln_in")
    s, v = lin(a, p, "W_s"), lin(a, p, "W_v")
    weights_h = torch.exp(s - s.max(1, keepdim=True).values)
    q_h = lin((weights_h * v).sum(1, keepdim=True) / weights_h.sum(1, keepdim=True), p, "W_comb")
    u = lin(a, p, "w_u")
    weights_a = torch.exp(u - u.max(1, keepdim=True).values)
    q_a = (weights_a * lin(a, p, "W_v2")).sum(1, keepdim=True) / weights_a.sum(1, keepdim=True)
    c = torch.cumsum(torch.sigmoid(lin(a, p, "W_g")) * lin(a, p, "W_v3"), 1)
    return block_tail(x, a, q_h, q_a, c, x.shape[1], p)


def causal_block_loop(x, p, n_norm):
    """The causal block, one token at a time: online softmax over the prefix, float64."""
    a = ln(gelu(lin(x, p, "W_in")), p, "ln_in")
    s, v, u, v2 = lin(a, p, "W_s"), lin(a, p, "W_v"), lin(a, p, "w_u"), lin(a, p, "W_v2")
    seq_in = torch.sigmoid(lin(a, p, "W_g")) * lin(a, p, "W_v3")
    batch, length, e = x.shape
    hm, hn, hd = torch.full((batch, e), -math.inf, dtype=x.dtype), torch.zeros(batch, e, dtype=x.dtype), 0.0
    am, an, ad = torch.full((batch, 1), -math.inf, dtype=x.dtype), torch.zeros(batch, e, dtype=x.dtype), 0.0
    c = torch.zeros(batch, e, dtype=x.dtype)
    q_h, q_a, cs = [], [], []
    for t in range(length):
        m_new = torch.maximum(hm, s[:, t])
        hn = hn * torch.exp(hm - m_new) + torch.exp(s[:, t] - m_new) * v[:, t]
        hd = hd * torch.exp(hm - m_new) + torch.exp(s[:, t] - m_new)
        hm = m_new
        m_new = torch.maximum(am, u[:, t])
        an = an * torch.exp(am - m_new) + torch.exp(u[:, t] - m_new) * v2[:, t]
        ad = ad * torch.exp(am - m_new) + torch.exp(u[:, t] - m_new)
        am = m_new
        c = c + seq_in[:, t]
        q_h.append(hn / hd)
        q_a.append(an / ad)
        cs.append(c)
    q_h = lin(torch.stack(q_h, 1), p, "W_comb")
    return block_tail(x, a, q_h, torch.stack(q_a, 1), torch.stack(cs, 1), n_norm, p)


def random_block(causal: bool, scale_scores: float = 1.0) -> ZarvanBlock:
    cfg = ModelConfig(arch="zarvan", vocab_size=50, d_model=24, n_heads=4, chunk_size=4, seq_norm=12.0,
                      causal=causal, num_classes=0 if causal else 3)
    block = ZarvanBlock(cfg)
    with torch.no_grad():
        for prm in block.parameters():  # random, not the init, so every term matters
            prm.normal_(0.0, 0.3)
        e = cfg.d_model
        block.in_proj.weight[:e] *= scale_scores         # holistic scores
        block.in_proj.weight[5 * e] *= scale_scores      # associative score
    return block


def test_bidirectional_block_matches_published_math():
    block = random_block(causal=False)
    x = torch.randn(3, 17, 24)
    out, state = block(x, {}, None, None)
    assert state == {}
    assert rel_err(out, published_block(x.double(), weights(block))) <= 1e-5


def test_causal_block_matches_token_loop():
    block = random_block(causal=True)
    x = torch.randn(2, 23, 24)
    out, _ = block(x, block.init_state(2), None, None)
    assert rel_err(out, causal_block_loop(x.double(), weights(block), 12.0)) <= 1e-5


def test_score_spread_over_200_in_a_window_is_exact_and_finite():
    block = random_block(causal=True, scale_scores=120.0)
    x = torch.randn(2, 40, 24)
    p = weights(block)
    a = ln(gelu(lin(x.double(), p, "W_in")), p, "ln_in")
    spread = lin(a, p, "W_s").amax(1) - lin(a, p, "W_s").amin(1)
    assert spread.max() > 200 and (lin(a, p, "w_u").amax(1) - lin(a, p, "w_u").amin(1)).max() > 200
    out, state = block(x, block.init_state(2), None, None)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in state.values())
    assert rel_err(out, causal_block_loop(x.double(), p, 12.0)) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_state = block(x, block.init_state(2), None, None)
    assert torch.isfinite(low).all() and all(torch.isfinite(t).all() for t in low_state.values())


def test_bfloat16_autocast_model_within_1e2():
    cfg = ModelConfig(arch="zarvan", vocab_size=50, d_model=32, n_heads=4, n_layers=2, chunk_size=8)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (2, 64))
    ref = model.double()(ids).logits
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids).logits
    assert torch.isfinite(low).all()
    assert rel_err(low.float(), ref) <= 1e-2


@pytest.mark.parametrize("pooled", [True, False])
def test_sequence_classifier_shapes_and_learning_signal(pooled):
    cfg = ModelConfig(arch="zarvan", vocab_size=40, d_model=32, n_heads=4, n_layers=1, causal=False,
                      num_classes=3, pooled=pooled)
    model = build_model(cfg)
    assert isinstance(model, ZarvanForSequenceClassification)
    logits = model(torch.randint(0, 40, (4, 9)))
    assert logits.shape == ((4, 3) if pooled else (4, 9, 3))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_debug_size_hand_count():
    from pathlib import Path
    cfg = ModelConfig.from_yaml(Path(__file__).parents[2] / "configs" / "models" / "zarvan-debug.yaml")
    e, h, v, layers = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    block = ((e * e + e) + 2 * e                 # adapter + LayerNorm
             + (e * (5 * e + 4) + 5 * e + 4)     # W_s, W_v, W_v', W_g, W_v'', w, W_gate
             + (e * e + e)                       # W_comb
             + (e * e + e) + 2 * e               # W_a + LayerNorm
             + (2 * e * e + e)                   # W_o
             + 2 * e                             # LayerNorm of the mixture
             + (e * h + h) + (h * e + e))        # FFN
    non_embedding = layers * block + 2 * e + e * v
    model = build_model(cfg)
    assert model.num_params() == non_embedding + v * e
    assert model.num_params(exclude_embedding=True) == non_embedding
    assert model.flops_per_token(2048) == 6 * non_embedding
