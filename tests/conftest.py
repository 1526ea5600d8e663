"""Shared test set-up: deterministic seeds, tiny model configs for every arch, a synthetic token dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zarvan_dist import ModelConfig

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, chunk_size=4, seq_norm=16.0,
            conv_kernel=4, dilations=[1, 2], supervisor_chunk=4, attn_window=8, ef_cycles=1)


def make_tiny_config(arch: str, **overrides) -> ModelConfig:
    """A small config of ``arch`` that exercises chunk boundaries with short sequences."""
    fields = dict(TINY, arch=arch)
    if arch == "zephyra":
        fields.update(embedding="adaptive", cutoffs=[8, 24])
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def tiny_config():
    return make_tiny_config


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread: with tiny tensors more threads add only synchronisation, which
    on a busy machine costs far more than the work (minutes instead of seconds for a training loop)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory) -> Path:
    """Random BOS-led documents: 60 train (~330 windows of 16 tokens, shards of 10 windows), 10 val."""
    from tests.pretrain.run_helpers import SEQ_LEN, VOCAB
    from tests.pretrain.token_data import random_documents, write_token_dataset

    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    write_token_dataset(root, {"train": random_documents(rng, 60, VOCAB, 20, 160),
                               "val": random_documents(rng, 10, VOCAB, 20, 100)}, SEQ_LEN, VOCAB, 10)
    return root
