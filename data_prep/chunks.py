"""The retrieval corpus as chunks: each document of a split's token stream cut into chunks of m tokens.

Chunks are aligned to documents (as in RETRO): a document's chunks start at its BOS and every m
tokens after it, and its last chunk may be shorter (padded with -1). So every chunk belongs to
exactly one document, and the chunk after it in the same document is its continuation.

``embed_corpus`` (the ``retrieval embed`` job) streams the split once, cuts it with
``DocumentChunker`` and writes, every ``chunks_per_shard`` chunks, one ``.npz`` shard holding the
chunks' embeddings, token ids and documents; ``embeddings.json`` (``EmbeddingsManifest``) lists
them. Resuming: ``progress.json`` records each finished shard and the stream position, document
and document start of the next chunk, so a re-run checks the recorded shards' sha256 and goes on
from the first missing one, ending with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import numpy as np
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.embedding import make_embedder
from data_prep.storage import filesystem, intact_prefix, load_journal, put_atomic, save_journal
from zarvan_dist.config import ConfigError, from_dict, to_dict
from zarvan_dist.data.manifest import SPLITS, dataset_root
from zarvan_dist.data.neighbours import manifest_sha256
from zarvan_dist.data.reader import WindowReader

EMBED_FORMAT = "zarvan-chunk-embeddings"
EMBED_VERSION = 1
EMBED_MANIFEST = "embeddings.json"
_WINDOWS_PER_READ = 256


def retrieval_root(dataset: str) -> str:
    """Default directory of a dataset's retrieval files: ``DIR/retrieval``."""
    return f"{dataset_root(dataset)}/retrieval"


def document_keys(reader: WindowReader, split: str) -> np.ndarray:
    """int64 key of each document of ``split`` in stream order: the first 8 bytes of its sha256.

    Two documents with the same text have the same key wherever they are, so "the query's own
    document" is recognised across splits and datasets.
    """
    entry = reader.manifest.split(split)
    url = reader.url(entry.documents_path)
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        keys = [int(json.loads(line)["sha256"][:16], 16) for line in lines]
    except (OSError, ValueError, KeyError) as exc:
        raise DataPrepError(f"{url}: cannot read the documents list: {exc}") from None
    if len(keys) != entry.documents:
        raise DataPrepError(f"{url}: {len(keys)} documents, the manifest says {entry.documents}")
    return np.array(keys, dtype=np.uint64).view(np.int64)


def stream_tokens(reader: WindowReader, split: str, start: int = 0) -> Iterator[np.ndarray]:
    """The split's token stream from stream position ``start`` on, in blocks.

    The stream is the split's streams (one per task, see ``Manifest.streams``) one after the other,
    each whole: its windows overlap by one token, so each is taken without its last token, and a
    stream's very last token after its last window. A stream starts with a BOS, so the documents
    met are those the split's documents list holds, in order.
    """
    m = reader.manifest
    streams = m.streams(split)
    lengths = [len(r) * m.seq_len + 1 for r in streams]
    total = sum(lengths)
    if not 0 <= start <= total:
        raise ValueError(f"stream position {start} outside the {total} tokens of split {split}")
    for r, length in zip(streams, lengths):
        if start >= length:
            start -= length
            continue
        first = r.start + min(start // m.seq_len, len(r) - 1)
        skip = start - (first - r.start) * m.seq_len
        start = 0
        block: list[np.ndarray] = []
        windows = reader.iter_windows(split, first)
        for i in range(first, r.stop):
            last = next(windows)
            block.append(last[skip:-1])
            if i == r.stop - 1:
                block.append(last[max(skip, m.seq_len):])
            skip = 0
            if len(block) >= _WINDOWS_PER_READ:
                yield np.concatenate(block).astype(np.int64)
                block = []
        windows.close()
        if block:
            yield np.concatenate(block).astype(np.int64)


@dataclass
class ChunkBatch:
    """Consecutive chunks of a stream."""

    tokens: np.ndarray
    """[n, m] int32 token ids, -1 after a document's last token."""
    doc: np.ndarray
    """[n] int64, ordinal of each chunk's document in the split."""
    start: np.ndarray
    """[n] int64, stream position of each chunk's first token."""
    doc_start: np.ndarray
    """[n] int64, stream position of the BOS of each chunk's document."""

    def __len__(self) -> int:
        return len(self.doc)

    def take(self, sl: slice) -> ChunkBatch:
        return ChunkBatch(self.tokens[sl], self.doc[sl], self.start[sl], self.doc_start[sl])

    @staticmethod
    def concat(parts: list[ChunkBatch], m: int) -> ChunkBatch:
        if not parts:
            z = np.zeros(0, dtype=np.int64)
            return ChunkBatch(np.zeros((0, m), dtype=np.int32), z, z, z)
        return ChunkBatch(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("tokens", "doc", "start", "doc_start")))


class DocumentChunker:
    """Cuts a token stream fed in blocks into document-aligned chunks of ``m`` tokens.

    The chunk still open (the stream's last chunk so far: a later BOS or more tokens decide where
    it ends) is held back until the next ``feed`` or ``finish``. A chunker can start anywhere a
    chunk starts, given that position, its document's ordinal and its document's start.
    """

    def __init__(self, m: int, bos: int, pos: int = 0, doc: int = -1, doc_start: int = 0) -> None:
        self.m, self.bos = m, bos
        self.pos, self.doc, self.doc_start = pos, doc, doc_start  # the next token's position and document
        self.pending = np.zeros(0, dtype=np.int64)  # tokens of the open chunk
        self.pending_start = pos

    def feed(self, block: np.ndarray) -> ChunkBatch:
        """The chunks closed by ``block`` (the tokens that follow those fed before)."""
        return self._cut(block, final=False)

    def finish(self) -> ChunkBatch:
        """The last chunk, closed by the stream's end."""
        return self._cut(np.zeros(0, dtype=np.int64), final=True)

    def _cut(self, block: np.ndarray, final: bool) -> ChunkBatch:
        m = self.m
        tokens = np.concatenate([self.pending, block])
        if len(tokens) == 0:
            return ChunkBatch.concat([], m)
        positions = self.pending_start + np.arange(len(tokens), dtype=np.int64)
        is_bos = np.zeros(len(tokens), dtype=bool)
        is_bos[len(self.pending):] = block == self.bos
        if self.doc < 0 and not is_bos[0]:
            raise DataPrepError(f"the stream does not start with BOS ({self.bos}) at position {positions[0]}")
        # the pending tokens belong to the current document (its BOS is at or before them)
        doc = self.doc + np.cumsum(is_bos)
        doc_start = np.maximum.accumulate(np.where(is_bos, positions, self.doc_start))
        offset = positions - doc_start
        starts = offset % m == 0
        starts[0] = True  # the pending chunk, or a resumed chunker's first token, starts a chunk
        cid = np.cumsum(starts) - 1
        n = int(cid[-1]) + 1
        out = np.full((n, m), -1, dtype=np.int32)
        out[cid, offset % m] = tokens
        first = np.flatnonzero(starts)
        batch = ChunkBatch(out, doc[first], positions[first], doc_start[first])
        self.doc, self.doc_start = int(doc[-1]), int(doc_start[-1])
        if final:
            self.pending = np.zeros(0, dtype=np.int64)
            self.pending_start = int(positions[-1]) + 1
            return batch
        self.pending = tokens[first[-1]:]
        self.pending_start = int(positions[first[-1]])
        return batch.take(slice(0, n - 1))


@dataclass
class EmbeddingShard:
    """One ``.npz`` file of chunk embeddings."""

    path: str
    """Location relative to the embeddings directory, e.g. ``shard-000000.npz``."""
    chunks: int
    """Chunks in the shard."""
    first_chunk: int
    """Global index of the shard's first chunk (chunk ids are what the index returns)."""
    bytes: int
    """Size of the file."""
    sha256: str
    """Hex sha256 of the file."""


@dataclass
class EmbeddingsManifest:
    """Contents of ``embeddings.json``: which corpus was cut and embedded how, and the shards.

    Each shard is an uncompressed ``.npz`` with ``embeddings`` float32 [n, dim] (unit vectors),
    ``tokens`` int32 [n, m] (-1 padding), ``doc`` int64 [n] (document ordinal in the corpus split),
    ``doc_key`` int64 [n] (first 8 bytes of the document's sha256) and ``start`` int64 [n]
    (stream position of the chunk's first token).
    """

    format: str
    """Always ``zarvan-chunk-embeddings``."""
    version: int
    """Layout version."""
    corpus: str
    """The token dataset the chunks come from (as given to the job)."""
    corpus_manifest_sha256: str
    """Hex sha256 of its ``manifest.json``."""
    split: str
    """The split that was cut."""
    chunk_len: int
    """m, tokens per chunk."""
    dim: int
    """Embedding width."""
    embedder: dict[str, Any]
    """How chunks are embedded (``make_embedder`` rebuilds it; queries use the same one)."""
    chunks: int
    """Chunks in all shards."""
    documents: int
    """Documents of the split."""
    shards: list[EmbeddingShard] = field(default_factory=list)
    """Shards in chunk order."""

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2) + "\n"

    @classmethod
    def load(cls, root: str) -> EmbeddingsManifest:
        path = f"{root.rstrip('/')}/{EMBED_MANIFEST}"
        try:
            with fsspec.open(path, "rt", encoding="utf-8") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            raise DataPrepError(f"{path}: no embeddings (run `python -m data_prep retrieval embed` first)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise DataPrepError(f"{path}: cannot read: {exc}") from None
        try:
            out = from_dict(cls, data)
        except ConfigError as exc:
            raise DataPrepError(f"{path}: {exc}") from None
        if out.format != EMBED_FORMAT or out.version != EMBED_VERSION:
            raise DataPrepError(f"{path}: not a {EMBED_FORMAT} v{EMBED_VERSION} manifest")
        return out


def read_embedding_shard(root: str, shard: EmbeddingShard, check: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one shard (``check``: verify its sha256 first)."""
    url = f"{root.rstrip('/')}/{shard.path}"
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataPrepError(f"{url}: embedding shard listed in {EMBED_MANIFEST} is missing") from None
    if check and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DataPrepError(f"{url}: sha256 does not match {EMBED_MANIFEST}")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if len(arrays.get("doc", ())) != shard.chunks:
        raise DataPrepError(f"{url}: holds {len(arrays.get('doc', ()))} chunks, {EMBED_MANIFEST} says {shard.chunks}")
    return arrays


@dataclass
class EmbedConfig:
    """Settings of the ``retrieval embed`` job."""

    corpus: str
    """fsspec URL of the token dataset to cut into chunks."""
    out: str | None = None
    """Directory of the embeddings; default ``CORPUS/retrieval/embeddings``."""
    split: str = "train"
    """Split of the corpus to cut."""
    chunk_len: int = 64
    """m, tokens per chunk."""
    embedder: str = "hashed"
    """``hashed`` (model-free hashed unigram and bigram counts) or ``checkpoint:PATH``."""
    dim: int = 256
    """Width of the hashed embedding (a checkpoint's embedding has its model's width)."""
    chunks_per_shard: int = 65536
    """Chunks per embeddings shard."""
    batch: int = 4096
    """Chunks embedded at once."""
    device: str = "auto"
    """Device of a checkpoint embedder: auto (cuda when available), cpu, cuda."""
    overwrite: bool = False
    """Replace embeddings of another configuration at ``out``."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        for name in ("chunk_len", "dim", "chunks_per_shard", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.out is None:
            self.out = f"{retrieval_root(self.corpus)}/embeddings"


def embed_corpus(cfg: EmbedConfig, progress: bool = True) -> dict[str, Any]:
    """Run the ``embed`` job; returns chunks, shards written and kept, seconds, chunks per second."""
    t0 = time.perf_counter()
    reader = WindowReader(cfg.corpus)
    man = reader.manifest
    if man.split(cfg.split).windows == 0:
        raise DataPrepError(f"{cfg.corpus}: split {cfg.split} has no windows to embed")
    keys = document_keys(reader, cfg.split)
    embedder = make_embedder(cfg.embedder, cfg.dim, cfg.device)
    job = json.loads(json.dumps({
        "corpus_manifest_sha256": manifest_sha256(cfg.corpus), "split": cfg.split, "chunk_len": cfg.chunk_len,
        "embedder": embedder.spec, "chunks_per_shard": cfg.chunks_per_shard,
    }))
    fs, root = filesystem(cfg.out)
    root = root.rstrip("/")
    state = load_journal(fs, root, cfg.out, job, cfg.overwrite, EMBED_MANIFEST, {"shards": [], "next": []})
    shards = [from_dict(EmbeddingShard, s) for s in state["shards"]]
    kept = intact_prefix(fs, root, shards)
    shards = shards[:kept]
    nexts = (state["next"] or [{"pos": 0, "doc": -1, "doc_start": 0}])[:kept + 1]  # nexts[i]: where shard i starts
    resume = nexts[kept]
    chunker = DocumentChunker(cfg.chunk_len, man.bos_id, resume["pos"], resume["doc"], resume["doc_start"])
    total_tokens = man.split(cfg.split).windows * man.seq_len + 1
    buffered: list[ChunkBatch] = []
    held = 0
    done = sum(s.chunks for s in shards)
    bar = tqdm(total=total_tokens, initial=resume["pos"], unit="tok", unit_scale=True,
               desc=f"embed {cfg.split}", disable=not progress)

    def flush(batch: ChunkBatch) -> None:
        nonlocal done
        emb = np.concatenate([embedder.embed(batch.tokens[i:i + cfg.batch])
                              for i in range(0, len(batch), cfg.batch)]) if len(batch) else np.zeros((0, embedder.dim), np.float32)
        buf = io.BytesIO()
        np.savez(buf, embeddings=emb.astype(np.float32), tokens=batch.tokens, doc=batch.doc,
                 doc_key=keys[batch.doc], start=batch.start)
        data = buf.getvalue()
        rel = f"shard-{len(shards):06d}.npz"
        put_atomic(fs, f"{root}/{rel}", data)
        shards.append(EmbeddingShard(rel, len(batch), done, len(data), hashlib.sha256(data).hexdigest()))
        done += len(batch)

    def drain(final: bool) -> None:
        nonlocal buffered, held
        while held >= cfg.chunks_per_shard or (final and held):
            allc = ChunkBatch.concat(buffered, cfg.chunk_len)
            n = min(cfg.chunks_per_shard, held)
            flush(allc.take(slice(0, n)))
            rest = allc.take(slice(n, None))
            buffered, held = ([rest] if len(rest) else []), len(rest)
            nxt = ({"pos": int(rest.start[0]), "doc": int(rest.doc[0]), "doc_start": int(rest.doc_start[0])}
                   if len(rest) else {"pos": chunker.pending_start, "doc": chunker.doc, "doc_start": chunker.doc_start})
            nexts.append(nxt)
            save_journal(fs, root, {"job": job, "shards": [to_dict(s) for s in shards], "next": nexts})

    for block in stream_tokens(reader, cfg.split, resume["pos"]):
        got = chunker.feed(block)
        buffered.append(got)
        held += len(got)
        bar.update(len(block))
        drain(final=False)
    got = chunker.finish()
    buffered.append(got)
    held += len(got)
    drain(final=True)
    bar.close()
    manifest = EmbeddingsManifest(EMBED_FORMAT, EMBED_VERSION, cfg.corpus, job["corpus_manifest_sha256"], cfg.split,
                                  cfg.chunk_len, embedder.dim, embedder.spec, done, man.split(cfg.split).documents,
                                  shards)
    put_atomic(fs, f"{root}/{EMBED_MANIFEST}", manifest.to_json().encode())
    seconds = time.perf_counter() - t0
    embedded = done - sum(s.chunks for s in shards[:kept])
    return {"out": cfg.out, "chunks": done, "shards": len(shards), "kept_shards": kept, "embedded": embedded,
            "seconds": seconds, "chunks_per_s": embedded / max(seconds, 1e-9), "dim": embedder.dim}
