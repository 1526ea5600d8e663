"""Zarvan v1: hand counts, the bidirectional classifier, the causal prefix form."""

from __future__ import annotations

from pathlib import Path

import torch

from zarvan_dist import ModelConfig, build_model
from zarvan_dist.models.zarvan_v1 import ZarvanV1ForSequenceClassification

CONFIGS = Path(__file__).parents[2] / "configs" / "models"


def test_debug_size_hand_count():
    cfg = ModelConfig.from_yaml(CONFIGS / "zarvan_v1-debug.yaml")
    e, h, v, layers = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    block = ((e * 2 * e + 2 * e) + (e * e + e) + (e * e + e)       # query in/out, context
             + (3 * e * h + h) + (h * 2 * e + 2 * e)               # gate MLP
             + (e * e + e) + (e * h + h) + (h * e + e) + 2 * e)    # update, FFN, LayerNorm
    non_embedding = layers * block + 2 * e + e * v                 # final LayerNorm, head
    model = build_model(cfg)
    assert model.num_params() == non_embedding + v * e
    assert model.num_params(exclude_embedding=True) == non_embedding
    assert model.flops_per_token(512) == 6 * non_embedding


def test_causal_query_is_the_normalised_prefix_sum():
    cfg = ModelConfig(arch="zarvan_v1", vocab_size=30, d_model=16, n_heads=4, n_layers=1, seq_norm=8.0)
    block = build_model(cfg).blocks[0]
    x = torch.randn(2, 9, 16)
    _, state = block(x, block.init_state(2), None, None)
    s, v = block.query_in(x).chunk(2, dim=-1)
    w = torch.softmax(s.view(2, 9, 4, 4), -1).view(2, 9, 16)
    assert torch.allclose(state["query_sum"], (w * v).sum(1), atol=1e-5)


def test_bidirectional_classifier():
    cfg = ModelConfig(arch="zarvan_v1", vocab_size=30, d_model=16, n_heads=4, n_layers=2, causal=False, num_classes=5,
                      init_std=0.5)  # large weights, so the far token's effect is well above rounding
    model = build_model(cfg)
    assert isinstance(model, ZarvanV1ForSequenceClassification)
    ids = torch.randint(0, 30, (3, 7))
    logits = model(ids)
    assert logits.shape == (3, 5)
    # bidirectional: the first position's logit sees the last token
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 30
    cfg_tok = ModelConfig(**{**cfg.to_dict(), "pooled": False})
    per_token = build_model(cfg_tok)
    assert not torch.allclose(per_token(ids)[:, 0], per_token(changed)[:, 0])
