"""Sampling from a causal LM with the recurrent state carried: each new token costs one 1-token step."""

from __future__ import annotations

import torch
from torch import Tensor

from zarvan_dist.models.common import CausalLM


@torch.no_grad()
def generate(model: CausalLM, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, bos_id: int | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Sample ``max_new_tokens`` after ``prompt`` [B, P] (int64); returns the new tokens [B, max_new_tokens].

    A model that streams (``model.streams``) reads the prompt once and then one token per step
    with its state carried, so the cost per token does not grow with the length; others (slam)
    re-read the whole sequence each step. ``temperature`` 0 is greedy decoding; ``top_k`` keeps
    the k most likely tokens; ``bos_id`` marks document starts inside the prompt.
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt: expected [batch, length>0] token ids, got shape {tuple(prompt.shape)}")
    was_training = model.training
    model.eval()
    doc_start = (prompt == bos_id) if bos_id is not None else None
    out = model(prompt, None, doc_start)
    tokens, seq = [], prompt
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        tokens.append(nxt)
        if len(tokens) == max_new_tokens:
            break
        if model.streams:
            out = model(nxt, out.state, (nxt == bos_id) if bos_id is not None else None)
        else:
            seq = torch.cat([seq, nxt], 1)
            out = model(seq, None, (seq == bos_id) if bos_id is not None else None)
    model.train(was_training)
    return torch.cat(tokens, 1) if tokens else prompt.new_zeros(prompt.shape[0], 0)
