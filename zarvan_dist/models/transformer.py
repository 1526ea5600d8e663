"""GPT-style attention baselines: ``transformer`` and ``zephyra`` (docs/models.md, "Zephyra Fusion").

Pre-norm blocks ``x + Attn(LN(x)); x + FFN(LN(x))`` with multi-head sliding-window causal
attention: a query sees the ``attn_window`` keys up to and including itself, within its own
document. The recurrent state of a block is its KV cache of the last ``attn_window - 1`` tokens
(``zarvan_dist.ops.attention.windowed_attention``), so one pass over T tokens and any split of
them into chunks with the state carried give the same logits.

``zephyra`` is the same model with adaptive input embeddings (``embedding: adaptive``, built by
the ``CausalLM`` shell); its config enforces that.
"""

from __future__ import annotations

from torch import Tensor, nn

from zarvan_dist.models.common import CausalLM, FeedForward
from zarvan_dist.models.config import ModelConfig
from zarvan_dist.ops.attention import empty_kv_cache, windowed_attention


class SelfAttentionProjections(nn.Module):
    """The linear maps around multi-head attention: x -> (q, k, v) heads, and heads -> output."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, E] -> q, k, v [B, H, T, D]."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge(self, out: Tensor) -> Tensor:
        """Attention output [B, H, T, D] -> [B, T, E] through the output projection."""
        batch, _, length, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(batch, length, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: sliding-window attention and a feed-forward layer, each with a residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.window = cfg.attn_window
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttentionProjections(cfg.d_model, cfg.n_heads)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        """An empty KV cache: k, v [B, H, W-1, D] zeros and seg [B, W-1] = -1."""
        k, v, seg = empty_kv_cache(batch_size, self.attn.n_heads, self.window, self.attn.head_dim, device)
        return {"k": k, "v": v, "seg": seg}

    def forward(self, x: Tensor, state: dict[str, Tensor], reset: Tensor | None, positions: Tensor):
        """x [B, T, E] -> (x [B, T, E], the KV cache after the chunk)."""
        q, k, v = self.attn.heads(self.attn_norm(x))
        out, (ck, cv, seg) = windowed_attention(q, k, v, self.window, reset, (state["k"], state["v"], state["seg"]))
        x = x + self.drop(self.attn.merge(out))
        x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return x, {"k": ck, "v": cv, "seg": seg}


class TransformerLM(CausalLM):
    """Causal sliding-window transformer LM (archs ``transformer`` and ``zephyra``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [TransformerBlock(cfg) for _ in range(cfg.n_layers)])

    def attention_flops(self, seq_len: int) -> float:
        """Training FLOPs per token of the scores and the mixing (PaLM, appendix B).

        ``12 * n_layers * d_model * keys``: q.k and p.v are 2 FLOPs per multiply-add each, times 3
        for forward and backward, with every query counted at ``keys = min(seq_len, attn_window)``
        keys (the causal half is not discounted, as in PaLM).
        """
        cfg = self.config
        return 12.0 * cfg.n_layers * cfg.d_model * min(seq_len, cfg.attn_window)
