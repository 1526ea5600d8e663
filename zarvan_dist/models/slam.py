"""SLAM v1 made causal: attention blocks with encoder-fusion (EF) cycles (docs/models.md, "SLAM v1").

Published form (bidirectional): an initial self-attention block; then ``ef_cycles`` times,
block A runs on the concatenation [first 60% of positions; last 60%], block B on
[last 60%; first 60%]; positions in the first 40% take A's output, positions past 60% take B's,
the overlap takes the mean of both; a final block. Interpretation choices of this causal form:

* Causal masks by ORIGINAL position: in every block a key is visible to a query when its
  original position is at most the query's and both are in the same document. Positions enter
  only at the embedding, so a token copied into both segments has two identical copies with
  identical outputs, and a key in the overlap is seen twice. The model computes each position
  once and weighs overlap keys by 2 (``log 2`` added to their scores), which is the attention
  over the concatenation exactly; the order of the segments inside the concatenation has no
  effect (nor in the published form: bidirectional attention is permutation-equivariant).
  ``tests/models/test_slam.py`` checks this against the literal concatenation in float64.
* The split is per document: a token whose document started at window index s splits the
  n = T - s tokens from s to the window's end, with the overlap [floor(0.4 n), n - floor(0.4 n)),
  so both "60%" segments have ceil(0.6 n) tokens and together cover every position for any
  n >= 1 (the published split with int(0.6 T) and int(0.4 T) fails when they do not add up to T).
  n is measured to the window's end, not to the next document start: where a later document
  starts is content the token must not see. A document that ends the row (the last one, whose
  n is its length) gets the logits it gets alone.
* Blocks are post-norm as published: ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``; attention
  spans the whole prefix inside the window (published: full self-attention; ``attn_window`` is
  not used), dropout is on the residual branches (once per position, not per copy).
* Depth is set by ``ef_cycles`` as published: 2 + 2 * ef_cycles blocks; ``n_layers`` is unused.

No state across windows: a token's split depends on how far its window extends (the window
length, never the content of a later token, so no logit reads the future), so a token's logits
depend on where the window ends and a chunked pass cannot equal one pass. SLAM is therefore
exempt from the streaming-equivalence test; its state is the shell's position counter only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from zarvan_dist.models.common import CausalLM, FeedForward
from zarvan_dist.models.config import ModelConfig
from zarvan_dist.models.transformer import SelfAttentionProjections
from zarvan_dist.ops.attention import prefix_attention
from zarvan_dist.ops.segments import last_reset_index


def fusion_split(reset: Tensor | None, batch: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Where each token falls in the EF split of its document's part of the window.

    A token whose document starts at window index s splits n = T - s tokens at b = floor(0.4 n)
    and a = n - b: the first segment is [0, a), the last is [b, n), the overlap [b, a), in
    positions counted from s. Only the document start (the past) and T enter, never a later
    document start.

    Args:
        reset: [B, T] bool or None; True where a new document starts.

    Returns:
        weight_a: [B, T] float32, the weight of block A's output (1 before the overlap, 1/2 in it,
            0 after it; block B gets 1 - weight_a).
        overlap: [B, T] bool, the token is in both segments.
    """
    idx = torch.arange(length, device=device).expand(batch, length)
    start = last_reset_index(reset).clamp(min=0) if reset is not None else torch.zeros_like(idx)
    rank = idx - start  # position inside the document
    n = length - start
    b = (2 * n) // 5
    overlap = (rank >= b) & (rank < n - b)
    weight_a = torch.where(rank < b, 1.0, torch.where(overlap, 0.5, 0.0))
    return weight_a, overlap


class SlamBlock(nn.Module):
    """Published encoder block, post-norm, with causal attention inside documents."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttentionProjections(cfg.d_model, cfg.n_heads)
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        """Nothing: SLAM carries no state across windows."""
        return {}

    def encode(self, x: Tensor, reset: Tensor | None, key_bias: Tensor | None = None) -> Tensor:
        """x [B, T, E] -> [B, T, E]; ``key_bias`` [B, T] is added to the scores of each key."""
        q, k, v = self.attn.heads(x)
        x = self.attn_norm(x + self.drop(self.attn.merge(prefix_attention(q, k, v, reset, key_bias))))
        return self.ffn_norm(x + self.drop(self.ffn(x)))

    def forward(self, x: Tensor, state: dict[str, Tensor], reset: Tensor | None, positions: Tensor):
        """x [B, T, E] -> (x [B, T, E], {})."""
        return self.encode(x, reset), {}


class FusionCycle(nn.Module):
    """One EF cycle: blocks A and B over the two overlapping segments, fused by position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.block_a = SlamBlock(cfg)
        self.block_b = SlamBlock(cfg)

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        """Nothing: SLAM carries no state across windows."""
        return {}

    def forward(self, x: Tensor, state: dict[str, Tensor], reset: Tensor | None, positions: Tensor):
        """x [B, T, E] -> (x [B, T, E], {})."""
        batch, length, _ = x.shape
        weight_a, overlap = fusion_split(reset, batch, length, x.device)
        # an overlap token is in both segments: two identical keys, i.e. one of weight 2
        key_bias = overlap.to(x.dtype) * math.log(2.0)
        out_a = self.block_a.encode(x, reset, key_bias)
        out_b = self.block_b.encode(x, reset, key_bias)
        w = weight_a[..., None].to(x.dtype)
        return w * out_a + (1.0 - w) * out_b, {}


class SlamLM(CausalLM):
    """Causal SLAM v1 LM (arch ``slam``): initial block, ``ef_cycles`` EF cycles, final block.

    Exempt from the streaming-equivalence test: its EF split is defined over the window (see
    the module docstring), so it carries no state from one window to the next.
    """

    streams = False

    def __init__(self, cfg: ModelConfig) -> None:
        blocks = [SlamBlock(cfg), *(FusionCycle(cfg) for _ in range(cfg.ef_cycles)), SlamBlock(cfg)]
        super().__init__(cfg, blocks)

    def attention_flops(self, seq_len: int) -> float:
        """Training FLOPs per token of the scores and the mixing (PaLM, appendix B).

        ``12 * (2 + 2 * ef_cycles) * d_model * seq_len``: every block attends over the whole
        prefix, each position computed once (overlap copies are folded into a key weight).
        """
        cfg = self.config
        return 12.0 * (2 + 2 * cfg.ef_cycles) * cfg.d_model * seq_len
