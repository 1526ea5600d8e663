"""Zarvan v2: a mixture of three context extractors under an expert gate (docs/models.md, "Zarvan v2 block").

Per block, with a_t = LayerNorm(GELU(W_in x_t)):
  holistic     q_h,t = W_comb (softmax-over-positions pooling of W_v a, one softmax per channel
               of the scores W_s a)
  associative  q_a,t = softmax-over-positions pooling of W_v' a with one scalar score w . a_t
  sequential   c_t = sum_{tau<=t} sigmoid(W_g a) * W_v'' a;  q_s,t = W_o [cos; sin](pi LN(W_a c_t / N))
  gate         [g_h, g_a, g_s]_t = SiLU(W_gate a_t);  m_t = g_h q_h + g_a q_a + g_s q_s
  output       x_t + FFN(LayerNorm(m_t))
The causal form pools the prefix (online softmax, exact and carried); the published
bidirectional form pools the whole sequence and uses N = T. The holistic softmax is per
channel, so its split into heads changes nothing numerically and is not materialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zarvan_dist.models.common import CausalLM, FeedForward, init_weights, sinusoidal
from zarvan_dist.models.config import ModelConfig
from zarvan_dist.ops.prefix_softmax import empty_softmax_state, prefix_softmax_pool
from zarvan_dist.ops.segments import prefix_sum


class ZarvanBlock(nn.Module):
    """One Zarvan v2 block; causal (prefix pooling, carried state) or bidirectional."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.d_model
        self.d_model = e
        self.causal = cfg.causal
        self.chunk_size = cfg.chunk_size
        self.seq_norm = cfg.seq_norm
        self.adapter = nn.Linear(e, e)
        self.adapter_norm = nn.LayerNorm(e)
        # one projection of a_t to: holistic scores and values, associative values,
        # sequential gate and values (E each), associative score (1) and expert gate (3)
        self.in_proj = nn.Linear(e, 5 * e + 4)
        self.holistic_out = nn.Linear(e, e)
        self.angle = nn.Linear(e, e)
        self.angle_norm = nn.LayerNorm(e)
        self.sequential_out = nn.Linear(2 * e, e)
        self.norm = nn.LayerNorm(e)
        self.ffn = FeedForward(e, cfg.ffn_dim)
        self.drop = nn.Dropout(cfg.dropout)
        # a module of its own so monitoring can hook the per-token weights of the three experts
        self.expert_gate = nn.SiLU()

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        """Empty prefix: online-softmax triples for both pooling extractors, zero running sum."""
        e = self.d_model
        hm, hn, hd = empty_softmax_state(batch_size, e, e, device)
        am, an, ad = empty_softmax_state(batch_size, 1, e, device)
        return {"hol_m": hm, "hol_n": hn, "hol_d": hd, "asc_m": am, "asc_n": an, "asc_d": ad,
                "seq_c": torch.zeros(batch_size, e, device=device)}

    def forward(self, x: Tensor, state: dict[str, Tensor], reset: Tensor | None, positions: Tensor):
        """x [B, T, E] -> (x [B, T, E], new state)."""
        e = self.d_model
        a = self.adapter_norm(F.gelu(self.adapter(x)))
        hs, hv, av, sg, sv, au, gate = self.in_proj(a).split([e, e, e, e, e, 1, 3], dim=-1)
        seq_in = torch.sigmoid(sg) * sv
        if self.causal:
            hol, (hm, hn, hd) = prefix_softmax_pool(
                hs, hv, (state["hol_m"], state["hol_n"], state["hol_d"]), reset, self.chunk_size)
            asc, (am, an, ad) = prefix_softmax_pool(
                au, av, (state["asc_m"], state["asc_n"], state["asc_d"]), reset, self.chunk_size)
            c, seq_c = prefix_sum(seq_in, state["seq_c"], reset)
            norm = self.seq_norm
            new_state = {"hol_m": hm, "hol_n": hn, "hol_d": hd, "asc_m": am, "asc_n": an,
                         "asc_d": ad, "seq_c": seq_c}
        else:
            hol = (torch.softmax(hs.float(), dim=1) * hv.float()).sum(1, keepdim=True)
            asc = (torch.softmax(au.float(), dim=1) * av.float()).sum(1, keepdim=True)
            c = torch.cumsum(seq_in.float(), dim=1)
            norm = float(x.shape[1])
            new_state = {}
        q_h = self.holistic_out(hol.to(x.dtype))
        omega = math.pi * self.angle_norm(self.angle((c / norm).to(x.dtype)))
        q_s = self.sequential_out(torch.cat([torch.cos(omega), torch.sin(omega)], dim=-1))
        g = self.expert_gate(gate)  # [B, T, 3]: holistic, associative, sequential
        mixed = g[..., 0:1] * q_h + g[..., 1:2] * asc.to(x.dtype) + g[..., 2:3] * q_s
        return x + self.drop(self.ffn(self.norm(mixed))), new_state


class ZarvanLM(CausalLM):
    """Causal Zarvan v2 language model with carried state (arch ``zarvan``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [ZarvanBlock(cfg) for _ in range(cfg.n_layers)])


class SequenceClassifier(nn.Module):
    """Published bidirectional form of a Zarvan model: embedding + positions, blocks, a head.

    The head reads the mean over positions (``pooled``) or every token; ``forward`` returns
    logits [B, num_classes] or [B, T, num_classes].
    """

    def __init__(self, cfg: ModelConfig, block: type[nn.Module]) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.classifier = nn.Linear(cfg.d_model, cfg.num_classes)
        init_weights(self, cfg.init_std)

    def forward(self, input_ids: Tensor) -> Tensor:
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        x = self.drop(self.embed(input_ids) + sinusoidal(positions, self.config.d_model))
        for block in self.blocks:
            x, _ = block(x, {}, None, positions)
        return self.classifier(x.mean(dim=1) if self.config.pooled else x)

    def num_params(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total


class ZarvanForSequenceClassification(SequenceClassifier):
    """The published bidirectional Zarvan v2 classifier (``arch: zarvan, causal: false``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, ZarvanBlock)
