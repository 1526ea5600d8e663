"""The model-free chunk embedder: deterministic unit vectors whose inner products follow n-gram overlap."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.embedding import HashedNgramEmbedder


def _chunks(seed: int, n: int, m: int = 64, vocab: int = 32000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, m))


def test_embeddings_are_unit_float32_and_the_same_on_every_call_and_instance():
    chunks = _chunks(0, 50)
    a = HashedNgramEmbedder(dim=128, seed=3).embed(chunks)
    b = HashedNgramEmbedder(dim=128, seed=3).embed(chunks)
    assert a.dtype == np.float32 and a.shape == (50, 128)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(a, b)
    # pinned values: a change of the hash functions would silently invalidate every index built before it
    pinned = HashedNgramEmbedder(dim=128, seed=3).embed(np.arange(64)[None])[0, :6]
    np.testing.assert_allclose(pinned, [0.144005, 0.048002, 0.0, -0.048002, -0.096003, 0.048002], atol=1e-6)
    assert not np.array_equal(a, HashedNgramEmbedder(dim=128, seed=4).embed(chunks))


def test_inner_products_follow_the_overlap_of_tokens_and_pairs():
    base = _chunks(1, 1)[0]
    rng = np.random.default_rng(2)
    embed = HashedNgramEmbedder(dim=256).embed
    sims = []
    for changed in (0, 8, 32, 64):  # positions replaced by random tokens
        other = base.copy()
        where = rng.choice(64, changed, replace=False)
        other[where] = rng.integers(0, 32000, changed)
        e = embed(np.stack([base, other]))
        sims.append(float(e[0] @ e[1]))
    assert sims[0] == pytest.approx(1.0, abs=1e-6)
    assert sims[0] > sims[1] > sims[2] > sims[3]
    unrelated = embed(_chunks(5, 200))
    off_diagonal = (unrelated @ unrelated.T)[~np.eye(200, dtype=bool)]
    assert abs(float(off_diagonal.mean())) < 0.02 and float(np.abs(off_diagonal).max()) < 0.4


def test_word_order_counts_through_the_pairs_and_padding_is_ignored():
    chunk = np.arange(100, 164)[None]
    embed = HashedNgramEmbedder(dim=256).embed
    reordered = embed(chunk[:, ::-1])
    same = embed(chunk)
    assert float(same[0] @ reordered[0]) < 0.8  # same tokens, other pairs
    padded = np.concatenate([chunk[:, :40], np.full((1, 24), -1)], axis=1)
    assert np.allclose(embed(padded), embed(chunk[:, :40]))
    assert not embed(np.full((1, 8), -1)).any()  # all padding: the zero vector, not NaN


def test_bad_shapes_and_sizes_are_errors():
    with pytest.raises(ValueError, match=r"expected \[N, m\]"):
        HashedNgramEmbedder().embed(np.arange(5))
    with pytest.raises(ValueError, match="dim and hashes must be positive"):
        HashedNgramEmbedder(dim=0)


def _export_dir(tmp_path):
    """A small nonattn model written like ``pretrain.export`` writes one."""
    import torch
    import yaml
    from safetensors.torch import save_model

    from zarvan_dist.config import to_dict
    from zarvan_dist.models import ModelConfig, build_model

    cfg = ModelConfig(arch="nonattn", vocab_size=50, d_model=16, n_layers=1, dilations=[1, 2], conv_kernel=4,
                      supervisor_chunk=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg)}))
    (tmp_path / "export.json").write_text("{}")
    return model


def test_checkpoint_embedder_is_the_normalised_mean_final_hidden_state(tmp_path):
    import safetensors.torch as safetensors_torch
    import torch

    from data_prep import DataPrepError
    from data_prep.embedding import make_embedder

    model = _export_dir(tmp_path).eval()
    emb = make_embedder(f"checkpoint:{tmp_path}", device="cpu")
    assert emb.dim == 16 and emb.spec["kind"] == "checkpoint"
    chunks = np.array([[5, 6, 7, 8], [9, 10, 11, -1]])
    got = emb.embed(chunks)
    with torch.no_grad():
        x, *_ = model.run_blocks(torch.tensor([[5, 6, 7, 8]]), None, None)
        want = torch.nn.functional.normalize(model.norm(x).mean(1), dim=-1).numpy()
        x3, *_ = model.run_blocks(torch.tensor([[9, 10, 11]]), None, None)
        want3 = torch.nn.functional.normalize(model.norm(x3).mean(1), dim=-1).numpy()
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want3[0], atol=1e-6)  # padding after the tokens changes nothing
    # the manifest's spec rebuilds the same embedder
    np.testing.assert_array_equal(make_embedder(emb.spec, device="cpu").embed(chunks), got)
    # and refuses a checkpoint whose weights changed since the corpus was embedded
    with torch.no_grad():
        model.embed.weight[0, 0] += 1.0
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    with pytest.raises(DataPrepError, match="not those the corpus was embedded with"):
        make_embedder(emb.spec, device="cpu")
    with pytest.raises(DataPrepError, match="is gone"):
        make_embedder({**emb.spec, "path": str(tmp_path / "rotated-away")}, device="cpu")


def test_embedder_option_errors_are_clear(tmp_path):
    from data_prep import DataPrepError
    from data_prep.embedding import make_embedder

    with pytest.raises(DataPrepError, match="hashed or checkpoint:PATH"):
        make_embedder("word2vec")
    with pytest.raises(DataPrepError, match="cannot load"):
        make_embedder(f"checkpoint:{tmp_path / 'missing'}", device="cpu")
