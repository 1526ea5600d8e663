"""Causal SLAM v1 against the literal concatenation of its EF segments, the contract, counts, learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zarvan_dist import ModelConfig, build_model
from zarvan_dist.models.common import sinusoidal
from zarvan_dist.models.slam import SlamBlock, SlamLM, fusion_split
from numerics import rel_err

VOCAB = 61


def small_config(**overrides) -> ModelConfig:
    fields = dict(arch="slam", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, attn_window=8, ef_cycles=2)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(**overrides) -> SlamLM:
    model = build_model(small_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random, not the init, so every term matters
            p.normal_(0.0, 0.3)
    return model


def reference_block(block: SlamBlock, x: torch.Tensor, original: list[int]) -> torch.Tensor:
    """The published post-norm encoder block on a sequence x [L, E] (float64) whose token j
    came from position original[j]: a query sees the keys from original positions <= its own."""
    e, h = x.shape[-1], block.attn.n_heads
    d = e // h

    def lin(y, m):
        return y @ m.weight.T + m.bias

    def ln(y, m):
        return F.layer_norm(y, (e,), m.weight, m.bias, 1e-5)

    q, k, v = lin(x, block.attn.qkv).view(len(original), 3, h, d).unbind(1)
    pos = torch.tensor(original)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
    scores = scores.masked_fill(pos[None, None, :] > pos[None, :, None], -math.inf)
    att = torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1), v).reshape(len(original), e)
    x = ln(x + lin(att, block.attn.out), block.attn_norm)
    return ln(x + lin(F.gelu(lin(x, block.ffn[0])), block.ffn[2]), block.ffn_norm)


def reference_document(model: SlamLM, x: torch.Tensor, n: int) -> torch.Tensor:
    """The blocks over one document x [m, E] whose EF split spans n >= m positions (from the
    document start to the window's end), EF cycles on the literal concatenations."""
    m = x.shape[0]
    x = reference_block(model.blocks[0], x, list(range(m)))
    cut = (2 * n) // 5  # floor(0.4 n): the last 60% starts here; the first 60% ends at n - cut
    first = [i for i in range(0, n - cut) if i < m]
    last = [i for i in range(cut, n) if i < m]
    for cycle in model.blocks[1:-1]:
        out_a = reference_block(cycle.block_a, torch.cat([x[first], x[last]]), first + last)
        out_b = reference_block(cycle.block_b, torch.cat([x[last], x[first]]), last + first)
        fused = torch.empty_like(x)
        for i in range(m):
            if i < cut:                                    # A, first segment
                fused[i] = out_a[first.index(i)]
            elif i < n - cut:                              # overlap: A and B, first segment
                fused[i] = (out_a[first.index(i)] + out_b[len(last) + first.index(i)]) / 2
            else:                                          # B, last segment
                fused[i] = out_b[last.index(i)]
        x = fused
    return reference_block(model.blocks[-1], x, list(range(m)))


def reference_logits(model: SlamLM, ids: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """Float64 logits [B, T, V], each document of each row on its own."""
    logits = []
    for row, starts in zip(ids, doc_start):
        bounds = [0, *[t for t in range(1, len(row)) if starts[t]], len(row)]
        parts = []
        for lo, hi in zip(bounds, bounds[1:]):
            x = model.embed(row[lo:hi]) * model.embed_scale + sinusoidal(torch.arange(hi - lo), model.config.d_model).double()
            parts.append(reference_document(model, x, len(row) - lo))
        logits.append(model.head(model.norm(torch.cat(parts))))
    return torch.stack(logits)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 23])
def test_model_matches_the_literal_concatenation(length):
    model = random_model().double()
    ids = torch.randint(0, VOCAB, (2, length))
    doc_start = torch.zeros_like(ids, dtype=torch.bool)
    if length > 4:
        doc_start[1, length // 3] = doc_start[1, length - 2] = True
    with torch.no_grad():
        ref = reference_logits(model, ids, doc_start)
        assert rel_err(model(ids, doc_start=doc_start).logits, ref) <= 1e-10
        assert rel_err(model.float()(ids, doc_start=doc_start).logits, ref) <= 1e-5


def test_fusion_split_covers_every_length():
    for n in range(1, 40):
        weight_a, overlap = fusion_split(None, 1, n, torch.device("cpu"))
        in_first = weight_a[0] > 0
        in_last = weight_a[0] < 1
        assert torch.equal(overlap[0], in_first & in_last)
        assert in_first.sum() == in_last.sum() == math.ceil(0.6 * n - 1e-9)  # both "60%" segments
        assert torch.equal(weight_a[0][overlap[0]], torch.full((int(overlap.sum()),), 0.5))
        assert not in_first[n - 1] or n < 3  # the last token takes B's output
    reset = torch.tensor([[True, False, False, False, False, True, False, False, False, False]])
    weight_a, _ = fusion_split(reset, 1, 10, torch.device("cpu"))
    # the first document splits the whole window (n = 10), the second its 5 tokens to the end
    assert weight_a.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0]]


def test_no_logit_reads_the_future():
    model = random_model()
    ids = torch.randint(0, VOCAB, (2, 29))
    base = model(ids).logits
    for t in (0, 7, 16, 28):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits = model(changed).logits
        assert torch.equal(logits[:, :t], base[:, :t]), f"a position before {t} changed"
        assert not torch.equal(logits[:, t], base[:, t])


def test_document_start_resets_the_row():
    model = random_model()
    doc_a, doc_b = torch.randint(0, VOCAB, (1, 13)), torch.randint(0, VOCAB, (1, 19))
    both = torch.cat([doc_a, doc_b], 1)
    doc_start = torch.zeros_like(both, dtype=torch.bool)
    doc_start[0, 13] = True
    out = model(both, doc_start=doc_start)
    alone = model(doc_b, model.init_state(1))
    assert rel_err(out.logits[:, 13:], alone.logits) <= 1e-5
    # A's split spans the window to its end (where B starts is content A must not see)
    assert set(out.state.keys()) == {"pos"}  # nothing else crosses a window


def test_params_and_flops_hand_count():
    named = ModelConfig.from_yaml(Path(__file__).parents[2] / "configs" / "models" / "slam-debug.yaml")
    for cfg in [small_config(ef_cycles=cycles) for cycles in (0, 1, 2)] + [named]:
        model = build_model(cfg)
        e, f, v, cycles = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.ef_cycles
        block = 2 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * e + (e * f + f) + (f * e + e)
        blocks = 2 + 2 * cycles  # initial, A and B per cycle, final; n_layers is not used
        rest = blocks * block + 2 * e + v * e
        assert model.num_params() == v * e + rest
        assert model.num_params(exclude_embedding=True) == rest
        for seq_len in (5, 100):
            assert model.flops_per_token(seq_len) == 6 * rest + 12 * blocks * e * seq_len
