"""Fixtures for the trainer tests: a small synthetic dataset (helpers live in run_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from run_helpers import SEQ_LEN, VOCAB
from token_data import random_documents, write_token_dataset


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory) -> Path:
    """Random BOS-led documents: 60 train (~330 windows of 16 tokens, shards of 10 windows), 10 val."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    write_token_dataset(root, {"train": random_documents(rng, 60, VOCAB, 20, 160),
                               "val": random_documents(rng, 10, VOCAB, 20, 100)}, SEQ_LEN, VOCAB, 10)
    return root
