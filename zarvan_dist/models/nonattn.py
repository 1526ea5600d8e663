"""The non-attention LLM, made a real causal LM (docs/models.md, "Non-attention LLM").

Per layer, on x [B, T, E]:
  "S4" block          x <- x + Dropout(W_pw GELU(DepthwiseCausalConv_k(x)))
  multi-resolution    x <- x + Dropout(sum_{d in dilations} GELU(CausalConv_{3, dilation d}(x)))
Then a chunk-level recurrent supervisor over chunks of C tokens aligned to the document start
(chunk of a token = its position in the document // C):
  r_k = mean of the chunk's hidden vectors (the output of the last layer),
  r_k <- r_k + sigmoid(gate) * tanh(W_f [LN(r_k); LN(retrieved)])     (retrieval fusion, optional),
  g_k = GRUCell(r_k, g_{k-1}),  g_{-1} = 0,
and every token of chunk k reads g_{k-1}: logits = head(LayerNorm(x + W_read g_{k-1})), with
W_read g_{-1} = 0. The supervisor thus reaches the logits, and no token reads its own chunk.

Retrieval (``cfg.retrieval``): ``neighbours`` [B, n, K, m] holds, for each window-aligned chunk
c (window tokens [c*C, (c+1)*C)), K neighbours of m token ids, computed offline from chunk c.
They are embedded with the token embedding and mean-pooled (ids < 0 are padding). The update
of a supervisor chunk closing at window index t fuses the latest window chunk that has fully
ended by then, c = (t+1) // C - 1, if it exists and starts inside the current document.
Rule: a token is influenced by the neighbours of window chunk c only if it lies in a later
window chunk (index >= (c+1)*C), since g_k is read only by tokens after the update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zarvan_dist.models.common import CausalLM, ModelOutput, init_weights
from zarvan_dist.models.config import ModelConfig
from zarvan_dist.models.state import RecurrentState
from zarvan_dist.ops.causal_conv import causal_conv1d


class CausalConv1d(nn.Module):
    """A causal convolution layer over [B, T, C]: full (C_in -> C_out) or depthwise.

    Weights are ``nn.Conv1d``-shaped ([C_out, C_in or 1, k]), drawn from Normal(0, std) like
    every other matmul weight of the project; the bias starts at zero.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, dilation: int = 1,
                 depthwise: bool = False, std: float = 0.02) -> None:
        super().__init__()
        if depthwise and in_channels != out_channels:
            raise ValueError("a depthwise convolution keeps the channel count")
        self.dilation = dilation
        self.tail_len = (kernel - 1) * dilation
        self.weight = nn.Parameter(torch.empty(out_channels, 1 if depthwise else in_channels, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: Tensor, tail: Tensor, reset: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B, T, C_in], tail [B, tail_len, C_in] -> (out [B, T, C_out], new tail)."""
        return causal_conv1d(x, self.weight, self.bias, self.dilation, tail, reset)


class NonAttnLayer(nn.Module):
    """One layer: the "S4" block (depthwise conv, GELU, pointwise) then the multi-resolution block.

    State: ``s4`` [B, k-1, E], the S4 convolution's input tail, and ``multires``
    [B, 2 * max(dilations), E], the input tail shared by the dilated convolutions (they all
    read the same input, so each takes the most recent 2*d frames of it).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.d_model
        self.d_model = e
        self.s4_conv = CausalConv1d(e, e, cfg.conv_kernel, depthwise=True, std=cfg.init_std)
        self.pointwise = nn.Linear(e, e)
        self.multires = nn.ModuleList(CausalConv1d(e, e, 3, d, std=cfg.init_std) for d in cfg.dilations)
        self.widest = max(range(len(self.multires)), key=lambda i: self.multires[i].tail_len)
        self.drop = nn.Dropout(cfg.dropout)

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        """Empty history: zero tails."""
        e = self.d_model
        span = self.multires[self.widest].tail_len
        return {"s4": torch.zeros(batch_size, self.s4_conv.tail_len, e, device=device),
                "multires": torch.zeros(batch_size, span, e, device=device)}

    def forward(self, x: Tensor, state: dict[str, Tensor], reset: Tensor | None, positions: Tensor):
        """x [B, T, E] -> (x [B, T, E], new state); ``positions`` is unused (convs see only lags)."""
        s4, s4_tail = self.s4_conv(x, state["s4"], reset)
        x = x + self.drop(self.pointwise(F.gelu(s4)))
        tail = state["multires"]
        mixed = 0
        for i, conv in enumerate(self.multires):
            y, conv_tail = conv(x, tail[:, tail.shape[1] - conv.tail_len:], reset)
            mixed = mixed + F.gelu(y)
            if i == self.widest:
                new_tail = conv_tail
        return x + self.drop(mixed), {"s4": s4_tail, "multires": new_tail}


class Supervisor(nn.Module):
    """Chunk-level GRU over document-aligned chunks of C tokens, read by the next chunk's tokens.

    State: ``g`` [B, E], the GRU state after the last closed chunk of the current document
    (zero before the first one closes), and ``sum`` [B, E], the sum of the hidden vectors of the
    open chunk. How many tokens the open chunk holds is the document position mod C, which the
    LM shell carries, so it is not stored again.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.d_model
        self.d_model = e
        self.chunk = cfg.supervisor_chunk
        self.cell = nn.GRUCell(e, e)
        self.read = nn.Linear(e, e, bias=False)
        if cfg.retrieval:
            # both inputs normalised: the chunk mean grows with training while pooled embeddings stay
            # small, and unnormalised they saturate the tanh, where no gradient reaches the fusion
            self.fuse_norm_chunk = nn.LayerNorm(e)
            self.fuse_norm_found = nn.LayerNorm(e)
            self.fuse = nn.Linear(2 * e, e)
            self.gate = nn.Parameter(torch.zeros(e))

    def init_state(self, batch_size: int, device=None) -> dict[str, Tensor]:
        """No closed chunk and an empty open chunk."""
        e = self.d_model
        return {"g": torch.zeros(batch_size, e, device=device), "sum": torch.zeros(batch_size, e, device=device)}

    def chunk_sums(self, h: Tensor, carried: Tensor, end: Tensor, count: Tensor) -> Tensor:
        """Sum of h over the ``count`` tokens ending at window index ``end`` (inclusive).

        Tokens before the window are the carried open chunk, represented by ``carried``.
        Summing the C gathered vectors (rather than differencing a running sum over the window)
        keeps each sum's rounding independent of the window's length and start, so streamed and
        whole-window runs agree.

        Args:
            h: [B, T, E]; carried: [B, E]; end, count: [B, S] int64 with count <= C.

        Returns:
            [B, S, E].
        """
        batch, slots = end.shape
        back = torch.arange(self.chunk, device=h.device)
        idx = end[..., None] - back  # [B, S, C]
        take = (back < count[..., None]) & (idx >= 0)
        rows = h.gather(1, idx.clamp(min=0).reshape(batch, -1, 1).expand(-1, -1, h.shape[-1]))
        total = (rows.reshape(batch, slots, self.chunk, -1) * take[..., None]).sum(2)
        reaches_back = (end - count + 1 < 0)[..., None]
        return total + carried.to(h.dtype)[:, None] * reaches_back

    def forward(self, h: Tensor, state: dict[str, Tensor], positions: Tensor,
                retrieved: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Add each token's read of the supervisor to its hidden vector.

        Args:
            h: [B, T, E], the last layer's output.
            state: ``g`` and ``sum`` [B, E].
            positions: [B, T] int64, positions inside the document (from the shell).
            retrieved: (pooled [B, n, E], present [B, n] bool) per window chunk, or None.

        Returns:
            h + W_read g_{k-1} [B, T, E] and the new state.
        """
        batch, length, _ = h.shape
        c = self.chunk
        closes = positions % c == c - 1  # token t closes its chunk: one GRU step after it
        slots = -(-length // c)  # a row closes at most ceil(T / C) chunks in a window
        closed = closes.long().cumsum(1)
        t = torch.arange(length, device=h.device).expand(batch, length)
        # window index of each row's s-th closing token (column `slots` collects the others)
        end = torch.zeros(batch, slots + 1, dtype=torch.long, device=h.device)
        end = end.scatter(1, torch.where(closes, closed - 1, slots), t)[:, :slots]
        has = torch.arange(slots, device=h.device) < closed[:, -1:]  # [B, S]
        end_pos = positions.gather(1, end)
        r = self.chunk_sums(h, state["sum"], end, torch.full_like(end, c)) / c  # [B, S, E]

        if retrieved is not None:
            pooled, present = retrieved
            window_chunk = (end + 1) // c - 1  # latest window chunk ended by the closing token
            doc_begin = end - end_pos  # window index of the document's first token
            wc = window_chunk.clamp(min=0)
            usable = (window_chunk >= 0) & (wc * c >= doc_begin) & present.gather(1, wc)
            found = pooled.gather(1, wc[..., None].expand(-1, -1, pooled.shape[-1])).to(r.dtype)
            inputs = torch.cat([self.fuse_norm_chunk(r), self.fuse_norm_found(found)], dim=-1)
            fused = torch.sigmoid(self.gate) * torch.tanh(self.fuse(inputs))
            r = r + fused * usable[..., None]

        g = state["g"].to(h.dtype)
        history = [g]
        for s in range(slots):
            # the first chunk of a document starts from zero, whatever was carried
            fresh = g * (end_pos[:, s] >= c)[:, None]
            g = torch.where(has[:, s, None], self.cell(r[:, s], fresh).to(g.dtype), g)
            history.append(g)
        reads = self.read(torch.stack(history, 1))  # [B, S + 1, E], once per chunk
        before = closed - closes.long()  # chunks closed in this window before token t
        out = reads.gather(1, before[..., None].expand(-1, -1, reads.shape[-1]))
        out = out * (positions >= c)[..., None].to(out.dtype)

        last_pos = positions[:, -1]
        open_sum = self.chunk_sums(h, state["sum"], t[:, -1:], ((last_pos + 1) % c)[:, None])[:, 0]
        new_g = g * (last_pos >= c - 1)[:, None]  # a document with no closed chunk carries none
        return h + out, {"g": new_g, "sum": open_sum}


class NonAttnLM(CausalLM):
    """Causal non-attention LM (arch ``nonattn``): causal conv layers, then the supervisor.

    ``forward`` takes, beyond the shell's arguments, ``neighbours`` [B, ceil(T/C), K, retrieval_len]
    (int64 token ids, < 0 for padding) when ``cfg.retrieval`` is set; None fuses nothing, which
    gives exactly the logits of the model without retrieval.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [NonAttnLayer(cfg) for _ in range(cfg.n_layers)])
        self.supervisor = Supervisor(cfg)
        # the shell initialised what it built; the supervisor's linears follow the same rule
        # (the GRU cell keeps PyTorch's uniform(+-1/sqrt(E)) initialisation)
        init_weights(self.supervisor, cfg.init_std)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RecurrentState:
        """Position 0, zero convolution tails, no closed chunk."""
        state = super().init_state(batch_size, device).to_dict()
        state.update({f"supervisor.{k}": v for k, v in self.supervisor.init_state(batch_size, device).items()})
        return RecurrentState(state)

    def pool_neighbours(self, neighbours: Tensor) -> tuple[Tensor, Tensor]:
        """neighbours [B, n, K, m] ids (< 0: padding) -> (mean embedding [B, n, E], any id [B, n])."""
        valid = neighbours >= 0
        emb = self.embed(neighbours.clamp(min=0))
        emb = emb * valid[..., None].to(emb.dtype)
        count = valid.flatten(2).sum(-1)
        pooled = emb.flatten(2, 3).sum(2) / count.clamp(min=1)[..., None]
        return pooled, count > 0

    def forward(self, input_ids: Tensor, state: RecurrentState | None = None, doc_start: Tensor | None = None,
                neighbours: Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] int64; doc_start [B, T] bool (state reset before those tokens);
        neighbours [B, ceil(T / C), K, m] int64 or None. Returns logits [B, T, V] and the state."""
        batch, length = input_ids.shape
        x, positions, state, new_state = self.run_blocks(input_ids, state, doc_start)
        retrieved = None
        if neighbours is not None:
            if not self.config.retrieval:
                raise ValueError("neighbours given to a model built without retrieval (cfg.retrieval false)")
            chunks, m = -(-length // self.config.supervisor_chunk), self.config.retrieval_len
            if neighbours.dim() != 4 or neighbours.shape[:2] != (batch, chunks) or neighbours.shape[3] != m:
                raise ValueError(f"neighbours {tuple(neighbours.shape)} is not [{batch}, {chunks}, K, {m}]")
            retrieved = self.pool_neighbours(neighbours)
        x, sup_state = self.supervisor(x, state.sub("supervisor"), positions, retrieved)
        new_state.update({f"supervisor.{k}": v for k, v in sup_state.items()})
        logits = self.head(self.norm(x))
        return ModelOutput(logits, RecurrentState(new_state))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters, the supervisor's counted once per chunk.

        Convolution weights count like linear weights (each multiplies once per token). The
        supervisor (GRU cell, read-out, retrieval fusion) runs once per chunk of C tokens, so
        its parameters count 1/C each; the neighbour embedding and pooling are lookups and sums.
        """
        chunk_rate = sum(p.numel() for p in self.supervisor.parameters())
        return super().flops_per_token(seq_len) - 6.0 * chunk_rate * (1.0 - 1.0 / self.config.supervisor_chunk)
