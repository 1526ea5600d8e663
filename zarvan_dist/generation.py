"""Generation from a causal LM with the recurrent state carried: each new token costs one 1-token step.

A ``Context`` is what B rows need to go on: each row's next-token logits, the model's state after
every token read so far and, for a model that does not stream (slam), the tokens themselves.
``read`` feeds tokens into a context (a prompt: chunk by chunk with the state carried, so a long
prompt costs the memory of one chunk), ``sample`` draws the next tokens from logits, ``decode``
samples tokens one by one and reads each back with a one-token forward of the whole batch.
``generate`` is the one-call form. A context flattens to a dict of tensors (``to_tensors``), so it
saves to safetensors and a generation stopped after k tokens continues exactly as one that was not.

Rows of different lengths are read one row at a time (a forward of batch 1 per chunk) and their
states stacked; rows of one length, and every decoding step, are read as one batch. A model that
does not stream re-reads each row's whole sequence for every token (its cost grows with the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from zarvan_dist.models.common import CausalLM
from zarvan_dist.models.state import RecurrentState

PAD = -1
"""Filler of ``Context.tokens`` after a row's last token."""


@dataclass
class Context:
    """The continuation point of B rows of generation.

    ``logits`` [B, V] float32 on the CPU: the next-token logits of each row.
    ``state``: the model's state after each row's tokens, on the model's device (empty for a model
    that does not stream). ``lengths`` [B] int64 on the CPU: tokens read per row. ``tokens``
    [B, max(lengths)] int64 on the CPU, ``PAD`` after a row's end: every token read, kept only for a
    model that does not stream (None otherwise).
    """

    logits: Tensor
    state: RecurrentState
    lengths: Tensor
    tokens: Tensor | None = None

    @property
    def rows(self) -> int:
        """Number of rows B."""
        return self.logits.shape[0]

    def row_tokens(self, row: int) -> Tensor:
        """The tokens read by ``row`` [lengths[row]] (a model that does not stream only)."""
        if self.tokens is None:
            raise ValueError("this context keeps no tokens (its model streams: the state holds the past)")
        return self.tokens[row, :int(self.lengths[row])]

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat ``{name: tensor}`` form (``state.<name>``, ``logits``, ``lengths``, ``tokens``) on the CPU."""
        out = {f"state.{k}": v for k, v in self.state.items()}
        out.update(logits=self.logits, lengths=self.lengths)
        if self.tokens is not None:
            out["tokens"] = self.tokens
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], device: torch.device | str = "cpu") -> "Context":
        """Inverse of ``to_tensors``; the state goes to ``device``."""
        missing = {"logits", "lengths"} - set(tensors)
        if missing:
            raise ValueError(f"not a generation context: no {', '.join(sorted(missing))} tensor")
        state = RecurrentState({k[len("state."):]: v.to(device) for k, v in tensors.items() if k.startswith("state.")})
        return cls(tensors["logits"].float(), state, tensors["lengths"].long(), tensors.get("tokens"))

    def check(self, model: CausalLM) -> None:
        """Raise ValueError naming the first thing in which this context does not fit ``model``."""
        vocab = model.config.vocab_size
        if self.logits.dim() != 2 or self.logits.shape[1] != vocab:
            raise ValueError(f"logits {tuple(self.logits.shape)} do not fit a vocabulary of {vocab}")
        if self.lengths.shape != (self.rows,):
            raise ValueError(f"lengths {tuple(self.lengths.shape)} do not fit {self.rows} rows")
        if model.streams:
            want = {k: (tuple(v.shape), v.dtype) for k, v in model.init_state(self.rows, "meta").items()}
            have = {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}
            if want != have:
                diff = sorted({k for k in want.keys() | have.keys() if want.get(k) != have.get(k)})
                raise ValueError(f"the state does not fit this model: {len(diff)} tensors differ in name, "
                                 f"shape or dtype ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})")
        elif self.tokens is None or self.tokens.shape[0] != self.rows:
            raise ValueError("a model that does not stream needs the tokens of every row")


def _doc_start(ids: Tensor, bos_id: int | None) -> Tensor | None:
    return (ids == bos_id) if bos_id is not None else None


@torch.no_grad()
def _stream(model: CausalLM, ids: Tensor, state: RecurrentState | None, bos_id: int | None,
            chunk: int) -> tuple[Tensor, RecurrentState]:
    """ids [B, T] through a streaming model, ``chunk`` tokens per forward: (last logits [B, V], state)."""
    device = next(model.parameters()).device
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start:start + chunk].to(device)
        out = model(part, state, _doc_start(part, bos_id))
        state, logits = out.state, out.logits[:, -1]
    # a copy: the row of the last position must not keep the chunk's logits [B, chunk, V] alive
    return logits.to("cpu", torch.float32, copy=True), state


@torch.no_grad()
def _reread(model: CausalLM, seq: Tensor, bos_id: int | None) -> Tensor:
    """The next-token logits [V] after ``seq`` [T], read in one forward (a model that does not stream)."""
    device = next(model.parameters()).device
    ids = seq[None].to(device)
    return model(ids, None, _doc_start(ids, bos_id)).logits[0, -1].float().cpu()


def _pad_rows(rows: Sequence[Tensor]) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def read(model: CausalLM, context: Context | None, rows: Sequence[Tensor], bos_id: int | None = None,
         chunk: int = 1024) -> Context:
    """Feed ``rows`` (B 1-D int64 tensors, one per row, each non-empty) after ``context`` (None: from
    nothing) and return the new context.

    A streaming model reads ``chunk`` tokens per forward with the state carried; rows of one length
    go as one batch, others one row at a time. ``bos_id`` marks document starts (state reset).
    """
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive number of tokens, got {chunk}")
    if not rows or any(r.dim() != 1 or r.numel() == 0 for r in rows):
        raise ValueError(f"rows: expected non-empty 1-D token tensors, got shapes {[tuple(r.shape) for r in rows]}")
    if context is not None and context.rows != len(rows):
        raise ValueError(f"rows: {len(rows)} given to continue a context of {context.rows} rows")
    rows = [r.long().cpu() for r in rows]
    before = context.lengths if context is not None else torch.zeros(len(rows), dtype=torch.long)
    lengths = before + torch.tensor([len(r) for r in rows])
    if not model.streams:
        seqs = [torch.cat([context.row_tokens(i), r]) if context is not None else r for i, r in enumerate(rows)]
        logits = torch.stack([_reread(model, s, bos_id) for s in seqs])
        return Context(logits, RecurrentState(), lengths, _pad_rows(seqs))
    if len({len(r) for r in rows}) == 1:
        logits, state = _stream(model, torch.stack(rows), context.state if context is not None else None,
                                bos_id, chunk)
        return Context(logits, state, lengths)
    parts = [_stream(model, r[None], context.state.select([i]) if context is not None else None,
                           bos_id, chunk)
             for i, r in enumerate(rows)]
    return Context(torch.cat([p[0] for p in parts]), RecurrentState.cat([p[1] for p in parts]), lengths)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the sampling setting out of range."""
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p}")


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """The next token of each row [B] (int64) drawn from ``logits`` [B, V].

    ``temperature`` 0 is greedy (argmax, no random draw). Otherwise the logits are divided by the
    temperature, cut to the ``top_k`` most likely tokens, then to the nucleus: the fewest most likely
    tokens whose probability reaches ``top_p`` (the most likely one always stays), and one token is
    drawn per row with ``generator`` (on the logits' device).
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ranked, order = logits.sort(-1, descending=True)
        probs = torch.softmax(ranked, -1)
        # a token is out when the tokens ranked above it already hold top_p
        out = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, ranked.masked_fill(out, float("-inf")))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def decode(model: CausalLM, context: Context, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, bos_id: int | None = None,
           generator: torch.Generator | None = None,
           on_token: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Context]:
    """Sample ``max_new_tokens`` per row after ``context``; returns them [B, N] and the context after them.

    Every sampled token is read back (the returned context continues after the last one), one
    1-token forward of the whole batch per token; ``on_token`` sees each step's tokens [B] as they
    come. Sampling is on the CPU (see ``sample``), so ``generator`` is a CPU generator and a run
    resumed from a saved context and the generator's saved state draws what one run would have.
    """
    was_training = model.training
    model.eval()
    new = []
    for _ in range(max_new_tokens):
        nxt = sample(context.logits, temperature, top_k, top_p, generator)
        new.append(nxt)
        if on_token is not None:
            on_token(nxt)
        context = read(model, context, list(nxt[:, None]), bos_id)
    model.train(was_training)
    return (torch.stack(new, 1) if new else torch.zeros(context.rows, 0, dtype=torch.long)), context


def generate(model: CausalLM, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, bos_id: int | None = None,
             generator: torch.Generator | None = None, top_p: float | None = None,
             prefill_chunk: int = 1024) -> Tensor:
    """Sample ``max_new_tokens`` after ``prompt`` [B, P] (int64); returns the new tokens [B, max_new_tokens]
    on the prompt's device.

    The prompt is read ``prefill_chunk`` tokens per forward with the state carried, then each token
    costs one 1-token step (see ``read`` and ``decode``); ``bos_id`` marks document starts. Sampling
    as in ``sample`` (``temperature`` 0: greedy; ``generator``: a CPU generator).
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt: expected [batch, length>0] token ids, got shape {tuple(prompt.shape)}")
    was_training = model.training
    model.eval()
    context = read(model, None, list(prompt), bos_id, prefill_chunk)
    new, _ = decode(model, context, max_new_tokens, temperature, top_k, top_p, bos_id, generator)
    model.train(was_training)
    return new.to(prompt.device)
