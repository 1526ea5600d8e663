"""Synthetic token datasets for the trainer tests: shards and manifest written straight from token
streams (no tokenizer), in the exact layout ``data_prep shards`` writes. Imported, not a test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from zarvan_dist.data.manifest import Manifest, ShardEntry, SplitEntry, Splits, TokenizerEntry, dtype_for_vocab
from zarvan_dist.data.shards import pack_shard, sample_bytes

BOS = 1


def write_token_dataset(root: str | Path, streams: dict[str, np.ndarray], seq_len: int, vocab: int,
                        windows_per_shard: int, documents: dict[str, int] | None = None) -> Manifest:
    """Write ``streams`` (split -> 1-D token stream) as a dataset under ``root``; returns its manifest."""
    root = Path(root)
    dtype = dtype_for_vocab(vocab)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(b"synthetic: no tokenizer")
    splits = {}
    for name in ("train", "val"):
        stream = np.asarray(streams.get(name, np.zeros(0)), dtype=dtype)
        n = max((len(stream) - 1) // seq_len, 0)
        index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        windows = stream[index] if n else np.zeros((0, seq_len + 1), dtype)
        (root / name).mkdir(parents=True, exist_ok=True)
        shards = []
        for k, first in enumerate(range(0, n, windows_per_shard)):
            data = pack_shard(windows[first:first + windows_per_shard], first)
            rel = f"{name}/shard-{k:06d}.tar"
            (root / rel).write_bytes(data)
            count = len(windows[first:first + windows_per_shard])
            shards.append(ShardEntry(rel, count, count * (seq_len + 1), len(data), hashlib.sha256(data).hexdigest()))
        docs_rel = f"{name}/documents.jsonl"
        (root / docs_rel).write_text("")
        tail = len(stream) - (n * seq_len + 1) if n else 0
        splits[name] = SplitEntry(
            documents=(documents or {}).get(name, int((stream == BOS).sum())), tokens=len(stream) if n else 0,
            windows=n, tail_tokens=tail, documents_path=docs_rel,
            documents_sha256=hashlib.sha256(b"").hexdigest(), shards=shards)
    manifest = Manifest(
        format="zarvan-token-shards", version=1, seq_len=seq_len, vocab_size=vocab, dtype=dtype,
        bos_id=BOS, eos_id=2, pad_id=3, unk_id=0,
        tokenizer=TokenizerEntry("tokenizer.model", "0" * 64, "synthetic"),
        windows_per_shard=windows_per_shard, sample_bytes=sample_bytes(seq_len, dtype),
        splits=Splits(**splits))
    (root / "manifest.json").write_text(manifest.to_json())
    return manifest


def random_documents(rng: np.random.Generator, count: int, vocab: int, min_len: int, max_len: int) -> np.ndarray:
    """A stream of ``count`` BOS-led documents of uniform random tokens in [4, vocab)."""
    parts = []
    for _ in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        parts.append(np.concatenate([[BOS], rng.integers(4, vocab, length - 1)]))
    return np.concatenate(parts)
