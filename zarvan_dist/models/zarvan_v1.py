"""Zarvan v1: a linear query extractor feeding gated token updates (docs/models.md, "Zarvan v1 block").

Per block:
  query        s_t = W_s x_t, v_t = W_v x_t in h heads of D channels; each position takes a
               softmax over the D channels of each head; q = W_c concat_heads(sum_t w_t * v_t)
  context      i = GELU(W_i q)
  gates        [in_t, f_t] = MLP([x_t; q; i])   (Linear(3E, H), GELU, Linear(H, 2E))
  update       g_t = sigmoid(in_t) * x_t + sigmoid(f_t) * (W_u x_t)
  output       LayerNorm(x_t + FFN(g_t + i + q))
The published (bidirectional) form sums over every position. The causal form sums the prefix
and divides by the constant ``seq_norm`` (a plain prefix sum grows with t); its state is the
running sum [B, E].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zarvan_dist.models.common import CausalLM, FeedForward
from zarvan_dist.models.config import ModelConfig
from zarvan_dist.models.zarvan import SequenceClassifier
from zarvan_dist.ops.segments import prefix_sum


class ZarvanV1Block(nn.Module):
    """One Zarvan v1 block; causal (prefix sum, carried) or bidirectional."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.d_model
        self.d_model = e
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.seq_norm = cfg.seq_norm
        self.query_in = nn.Linear(e, 2 * e)  # scores and values
        self.query_out = nn.Linear(e, e)
        self.context = nn.Linear(e, e)
        self.gates = nn.Sequential(nn.Linear(3 * e, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, 2 * e))
        self.update = nn.Linear(e, e)
        self.ffn = FeedForward(e, cfg.ffn_dim)
        self.norm = nn.LayerNorm(e)
        self.drop = nn.Dropout(cfg.dropout)

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        """The running sum of the query extractor, zero."""
        return {"query_sum": torch.zeros(batch_size, self.d_model, device=device)}

    def forward(self, x: Tensor, state: dict[str, Tensor], reset: Tensor | None, positions: Tensor):
        """x [B, T, E] -> (x [B, T, E], new state)."""
        batch, length, e = x.shape
        s, v = self.query_in(x).chunk(2, dim=-1)
        w = torch.softmax(s.float().view(batch, length, self.n_heads, -1), dim=-1).view(batch, length, e)
        weighted = w * v.float()
        if self.causal:
            total, final = prefix_sum(weighted, state["query_sum"], reset)
            pooled = total / self.seq_norm
            new_state = {"query_sum": final}
        else:
            pooled = weighted.sum(dim=1, keepdim=True)
            new_state = {}
        q = self.query_out(pooled.to(x.dtype)).expand(batch, length, e)
        i = F.gelu(self.context(q))
        gate_in, gate_forget = self.gates(torch.cat([x, q, i], dim=-1)).chunk(2, dim=-1)
        g = torch.sigmoid(gate_in) * x + torch.sigmoid(gate_forget) * self.update(x)
        return self.norm(x + self.drop(self.ffn(g + i + q))), new_state


class ZarvanV1LM(CausalLM):
    """Causal Zarvan v1 language model with carried state (arch ``zarvan_v1``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [ZarvanV1Block(cfg) for _ in range(cfg.n_layers)])


class ZarvanV1ForSequenceClassification(SequenceClassifier):
    """The published bidirectional Zarvan v1 classifier (``arch: zarvan_v1, causal: false``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, ZarvanV1Block)
