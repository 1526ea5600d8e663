"""Pieces every arch shares: the output type, embeddings, positions and the causal-LM shell.

A causal model here is ``embedding + sinusoidal position -> blocks -> LayerNorm -> head``.
Each block is a module with ``init_state(batch_size, device) -> dict`` and
``forward(x, state: dict, reset, positions) -> (x, dict)``; ``CausalLM`` owns the position
counter and names each block's state ``layers.<i>.<name>``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zarvan_dist.models.config import ModelConfig
from zarvan_dist.models.state import RecurrentState
from zarvan_dist.ops.segments import segment_positions


class ModelOutput(NamedTuple):
    """What a causal model returns: logits [B, T, V] and the state after the last token."""

    logits: Tensor
    state: RecurrentState


def sinusoidal(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal position encoding [*, dim] (float32) of integer ``positions`` [*].

    Channels 2i and 2i+1 hold sin and cos of ``pos / 10000^(2i/dim)``.
    """
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    angle = positions.to(torch.float32)[..., None] * freq
    enc = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)
    if dim % 2:
        enc = F.pad(enc, (0, 1))
    return enc


class AdaptiveInput(nn.Module):
    """Adaptive input embedding (Baevski & Auli): frequency bands of shrinking width.

    Ids in ``[edges[i], edges[i+1])`` embed to ``d_model / factor**i`` dimensions and are
    projected to ``d_model``. Ids are assumed sorted by frequency (sentencepiece orders its
    vocabulary by score, which tracks frequency).
    """

    def __init__(self, vocab_size: int, d_model: int, cutoffs: list[int], factor: float) -> None:
        super().__init__()
        self.edges = [0, *cutoffs, vocab_size]
        self.d_model = d_model
        self.bands = nn.ModuleList()
        self.projections = nn.ModuleList()
        for i in range(len(self.edges) - 1):
            width = max(1, int(d_model // (factor ** i)))
            self.bands.append(nn.Embedding(self.edges[i + 1] - self.edges[i], width))
            self.projections.append(nn.Linear(width, d_model, bias=False))

    def forward(self, ids: Tensor) -> Tensor:
        """ids [*] int64 -> [*, d_model]."""
        out = torch.zeros(*ids.shape, self.d_model, device=ids.device, dtype=self.projections[0].weight.dtype)
        for i, (band, proj) in enumerate(zip(self.bands, self.projections)):
            lo, hi = self.edges[i], self.edges[i + 1]
            mask = (ids >= lo) & (ids < hi)
            local = (ids - lo).clamp(0, hi - lo - 1)
            # every band runs on every id (masked), so shapes stay static for the compiler
            out = out + proj(band(local)) * mask[..., None].to(out.dtype)
        return out


def build_token_embedding(cfg: ModelConfig) -> nn.Module:
    """nn.Embedding, or AdaptiveInput when ``cfg.embedding == 'adaptive'``."""
    if cfg.embedding == "adaptive":
        return AdaptiveInput(cfg.vocab_size, cfg.d_model, cfg.cutoffs, cfg.adaptive_factor)
    return nn.Embedding(cfg.vocab_size, cfg.d_model)


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FeedForward(nn.Sequential):
    """Linear(E, H), GELU, Linear(H, E)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))


class CausalLM(nn.Module):
    """Embedding + sinusoidal positions -> blocks -> LayerNorm -> head, with recurrent state.

    Subclasses build ``self.blocks``; the shell carries the position counter (``pos`` [B],
    reset with the document) and each block's state.
    """

    streams = True
    """Windows fed one after another with the state carried give the logits of one long window."""

    def __init__(self, cfg: ModelConfig, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.config = cfg
        self.embed = build_token_embedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)
        # Token embeddings are N(0, 1/E) and scaled by sqrt(E) in the forward (Vaswani et al. 3.4): at
        # unit scale beside the sinusoidal encoding (std 0.02 would leave them ~30x below it on long
        # documents, and models then sit at the unigram loss for hundreds of steps).
        self.embed_scale = math.sqrt(cfg.d_model)
        for m in self.embed.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=cfg.d_model ** -0.5)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    # the state
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RecurrentState:
        """The state before any token: position 0 and every block's empty state."""
        parts = {f"layers.{i}": b.init_state(batch_size, device) for i, b in enumerate(self.blocks)}
        # the keys in the order a forward returns them, so a compiled model sees one state layout
        state = {"pos": torch.zeros(batch_size, dtype=torch.long, device=device)}
        state.update(RecurrentState.join(parts).to_dict())
        return RecurrentState(state)

    def embed_tokens(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """sqrt(E) x token embedding plus the sinusoidal encoding of ``positions``: [B, T, E]."""
        x = self.embed(input_ids) * self.embed_scale
        x = x + sinusoidal(positions, self.config.d_model).to(x.dtype)
        return self.drop(x)

    def run_blocks(self, input_ids: Tensor, state: RecurrentState | None, doc_start: Tensor | None):
        """Embedding and blocks, without the head.

        Returns the last block's output [B, T, E], the per-document positions [B, T], the
        resolved state (``init_state`` when None was given) and the new state as a dict.
        """
        batch, length = input_ids.shape
        if state is None:
            state = self.init_state(batch, input_ids.device)
        reset = doc_start.to(torch.bool) if doc_start is not None else None
        positions, next_pos = segment_positions(state["pos"], reset, length)
        x = self.embed_tokens(input_ids, positions)
        new_state: dict[str, Tensor] = {"pos": next_pos}
        for i, block in enumerate(self.blocks):
            x, block_state = block(x, state.sub(f"layers.{i}"), reset, positions)
            new_state.update({f"layers.{i}.{k}": v for k, v in block_state.items()})
        return x, positions, state, new_state

    def forward(self, input_ids: Tensor, state: RecurrentState | None = None, doc_start: Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] int64; doc_start [B, T] bool (state reset before those tokens)."""
        x, _, _, new_state = self.run_blocks(input_ids, state, doc_start)
        return ModelOutput(self.head(self.norm(x)), RecurrentState(new_state))

    # accounting
    def embedding_params(self) -> int:
        """Parameters of the embedding tables (lookups, no FLOPs)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters (shared ones once); optionally without the embedding tables."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embedding_params() if exclude_embedding else total

    def attention_flops(self, seq_len: int) -> float:
        """Training FLOPs per token of the attention scores and mixing (0 for linear models)."""
        return 0.0

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (parameters used in matmuls) + the attention term.

        Matmul parameters are all parameters but the embedding tables, plus the head when it
        is tied to the embedding (the head still multiplies). Element-wise scans are not counted.
        """
        matmul = self.num_params(exclude_embedding=True)
        if self.config.tie_embeddings:
            matmul += self.head.weight.numel()
        return 6.0 * matmul + self.attention_flops(seq_len)
