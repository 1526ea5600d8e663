"""Synthetic token datasets for the trainer tests: shards and manifest written straight from token
streams (no tokenizer), in the layout ``data_prep shards`` writes (format version 2, one task), and
neighbour sidecars of random ids in the layout ``data_prep retrieval neighbours`` writes. Imported, not a test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from zarvan_dist.data.manifest import Manifest, ShardEntry, SplitEntry, Splits, TokenizerEntry, dtype_for_vocab
from zarvan_dist.data.neighbours import (
    FORMAT,
    FORMAT_VERSION,
    NeighbourManifest,
    NeighbourShard,
    NeighbourSplit,
    NeighbourSplits,
    manifest_sha256,
    pack_neighbour_shard,
)
from zarvan_dist.data.neighbours import sample_bytes as neighbour_sample_bytes
from zarvan_dist.data.shards import pack_shard, sample_bytes

BOS = 1


def write_token_dataset(root: str | Path, streams: dict[str, np.ndarray], seq_len: int, vocab: int,
                        windows_per_shard: int, documents: dict[str, int] | None = None,
                        tokenizer: bytes | None = None) -> Manifest:
    """Write ``streams`` (split -> 1-D token stream) as a dataset under ``root``; returns its manifest.
    ``tokenizer``: the bytes of a sentencepiece model to ship (recorded with its sha256), else a stand-in."""
    root = Path(root)
    dtype = dtype_for_vocab(vocab)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(tokenizer or b"synthetic: no tokenizer")
    splits = {}
    for name in ("train", "val"):
        stream = np.asarray(streams.get(name, np.zeros(0)), dtype=dtype)
        n = max((len(stream) - 1) // seq_len, 0)
        index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        windows = stream[index] if n else np.zeros((0, seq_len + 1), dtype)
        (root / name).mkdir(parents=True, exist_ok=True)
        shards = []
        for k, first in enumerate(range(0, n, windows_per_shard)):
            data = pack_shard(windows[first:first + windows_per_shard], first, task=0)
            rel = f"{name}/shard-{k:06d}.tar"
            (root / rel).write_bytes(data)
            count = len(windows[first:first + windows_per_shard])
            shards.append(ShardEntry(rel, count, count * (seq_len + 1), len(data), hashlib.sha256(data).hexdigest(),
                                     task=0, first_key=first))
        docs_rel = f"{name}/documents.jsonl"
        (root / docs_rel).write_text("")
        tail = len(stream) - (n * seq_len + 1) if n else 0
        splits[name] = SplitEntry(
            documents=(documents or {}).get(name, int((stream == BOS).sum())), tokens=len(stream) if n else 0,
            windows=n, tail_tokens=tail, documents_path=docs_rel,
            documents_sha256=hashlib.sha256(b"").hexdigest(), shards=shards)
    manifest = Manifest(
        format="zarvan-token-shards", version=2, seq_len=seq_len, vocab_size=vocab, dtype=dtype,
        bos_id=BOS, eos_id=2, pad_id=3, unk_id=0,
        tokenizer=TokenizerEntry("tokenizer.model", hashlib.sha256(tokenizer).hexdigest() if tokenizer else "0" * 64,
                                 "given" if tokenizer else "synthetic"),
        windows_per_shard=windows_per_shard, sample_bytes=sample_bytes(seq_len, dtype, crc=True),
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


def write_neighbour_sidecar(root: str | Path, dataset: str | Path, chunk_len: int, k: int, neighbour_len: int,
                            seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a neighbour sidecar of ``dataset`` under ``root``: random ids in [-1, vocab) (-1: padding),
    distances increasing along K. Returns split -> (ids [N, n, K, L] int32, distances [N, n, K] float32)."""
    root = Path(root)
    tokens = Manifest.load(str(dataset))
    rng = np.random.default_rng(seed)
    n = -(-tokens.seq_len // chunk_len)
    per_shard = tokens.windows_per_shard
    written, splits = {}, {}
    for name in ("train", "val"):
        windows = tokens.split(name).windows
        ids = rng.integers(-1, tokens.vocab_size, (windows, n, k, neighbour_len)).astype(np.int32)
        distances = np.sort(rng.random((windows, n, k)), axis=-1).astype(np.float32)
        (root / name).mkdir(parents=True, exist_ok=True)
        shards = []
        for j, first in enumerate(range(0, windows, per_shard)):
            data = pack_neighbour_shard(ids[first:first + per_shard], distances[first:first + per_shard], first)
            rel = f"{name}/shard-{j:06d}.tar"
            (root / rel).write_bytes(data)
            shards.append(NeighbourShard(rel, len(ids[first:first + per_shard]), len(data),
                                         hashlib.sha256(data).hexdigest()))
        splits[name] = NeighbourSplit(windows, shards)
        written[name] = ids, distances
    manifest = NeighbourManifest(
        format=FORMAT, version=FORMAT_VERSION, dataset_manifest_sha256=manifest_sha256(str(dataset)),
        seq_len=tokens.seq_len, chunk_len=chunk_len, chunks_per_window=n, k=k, neighbour_len=neighbour_len,
        corpus_chunk_len=neighbour_len // 2, windows_per_shard=per_shard,
        sample_bytes=neighbour_sample_bytes(n, k, neighbour_len), splits=NeighbourSplits(**splits))
    (root / "neighbours.json").write_text(manifest.to_json())
    return written
