"""Fixtures: the test corpus on disk, one tokenizer trained on it per session, a shards-job runner."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from data_prep.corpus import CorpusConfig
from data_prep.shards import ShardsConfig, write_shards
from data_prep.tokenizer import TokenizerConfig, train_tokenizer
from prep_helpers import SEQ_LEN, VOCAB, WINDOWS_PER_SHARD, corpus_files, write_files


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_files(str(root), corpus_files())
    return root


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, corpus_dir) -> str:
    out = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(TokenizerConfig(out=out, vocab_size=VOCAB, corpus=CorpusConfig(inputs=[str(corpus_dir)])),
                    progress=False)
    return out


@pytest.fixture
def make_shards(tokenizer_path, corpus_dir):
    """Run the shards job on the test corpus: ``make_shards(out, **config overrides) -> summary``."""
    def run(out: str, inputs: list[str] | None = None, **overrides) -> dict:
        fields = dict(tokenizer=tokenizer_path, out=str(out), seq_len=SEQ_LEN, val_fraction=0.1,
                      windows_per_shard=WINDOWS_PER_SHARD)
        fields.update(overrides)
        corpus = CorpusConfig(inputs=inputs if inputs is not None else [str(corpus_dir)])
        return write_shards(ShardsConfig(corpus=corpus, **fields), progress=False)
    return run


@pytest.fixture
def memory_root():
    """A fresh memory:// directory, removed afterwards (the memory filesystem is process-wide)."""
    url = f"memory://test-{uuid.uuid4().hex}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
