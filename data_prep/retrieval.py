"""The ``retrieval neighbours`` job: the k nearest corpus chunks of every chunk of every window.

For each split of a token dataset and each token shard, the windows' inputs are cut into chunks
of C tokens (window-aligned: chunk c is inputs ``[c*C, (c+1)*C)``), embedded with the embedder
that embedded the corpus, and searched in the index. Corpus chunks of any document a query chunk
overlaps (recognised by the documents' sha256, so across splits and datasets too) are dropped, the
search widening until k others are found. Each neighbour is stored as its tokens followed by its
continuation (the next chunk of its document), m tokens each, -1 where the document ends; the
sidecar shard k holds the windows of token shard k (format: ``zarvan_dist.data.neighbours``).

Resuming: ``progress.json`` records each finished sidecar shard (sha256) and how many BOS came
before the next one; a re-run keeps the intact prefix and ends byte-identical to an uninterrupted
run (FAISS search is deterministic per query on CPU).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.chunks import (
    EmbeddingsManifest,
    document_keys,
    read_embedding_shard,
    retrieval_root,
)
from data_prep.embedding import make_embedder
from data_prep.faiss_index import Searcher, load_index, resolve_device
from data_prep.storage import filesystem, intact_prefix, load_journal, put_atomic, save_journal
from zarvan_dist.config import ConfigError, from_dict, to_dict
from zarvan_dist.data.manifest import SPLITS
from zarvan_dist.data.neighbours import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    NeighbourManifest,
    NeighbourShard,
    NeighbourSplit,
    NeighbourSplits,
    manifest_sha256,
    pack_neighbour_shard,
    sample_bytes,
)
from zarvan_dist.data.reader import WindowReader

_FIRST_WIDTH = 16  # extra results asked for at first, to make up for dropped same-document chunks


@dataclass
class NeighboursConfig:
    """Settings of the ``retrieval neighbours`` job."""

    dataset: str
    """fsspec URL of the token dataset whose windows get neighbours."""
    retrieval: str | None = None
    """Directory holding ``embeddings/`` and ``index/``; default ``DATASET/retrieval``."""
    out: str | None = None
    """Directory of the sidecar shards; default ``DATASET/retrieval/neighbours``."""
    chunk_len: int = 64
    """C, tokens per query chunk of a window: the model's ``supervisor_chunk``."""
    k: int = 2
    """Neighbours per chunk."""
    nprobe: int | None = None
    """Lists searched per query; default: the calibrated value in ``index.json``."""
    device: str = "auto"
    """Search device: auto (GPUs when faiss-gpu sees them), cpu, cuda."""
    overwrite: bool = False
    """Replace sidecar shards of another configuration at ``out``."""

    def __post_init__(self) -> None:
        for name in ("chunk_len", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"nprobe: expected a positive integer, got {self.nprobe}")
        if self.retrieval is None:
            self.retrieval = retrieval_root(self.dataset)
        if self.out is None:
            self.out = f"{retrieval_root(self.dataset)}/neighbours"


class Corpus:
    """What the search results are turned into: every corpus chunk's tokens, continuation and document."""

    def __init__(self, emb_root: str, manifest: EmbeddingsManifest, progress: bool) -> None:
        tokens, keys, docs = [], [], []
        for shard in tqdm(manifest.shards, desc="load corpus chunks", unit="shard", disable=not progress):
            z = read_embedding_shard(emb_root, shard, check=True)
            tokens.append(z["tokens"])
            keys.append(z["doc_key"])
            docs.append(z["doc"])
        self.m = manifest.chunk_len
        self.tokens = np.concatenate(tokens) if tokens else np.zeros((0, self.m), np.int32)
        self.keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        doc = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        # chunk j's continuation is chunk j + 1 when it belongs to the same document
        self.has_next = np.append(doc[1:] == doc[:-1], False)

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """ids [...] (-1: none) -> int32 [..., 2m]: chunk then continuation, -1 padded."""
        flat = ids.reshape(-1)
        out = np.full((len(flat), 2 * self.m), -1, dtype=np.int32)
        ok = flat >= 0
        out[ok, :self.m] = self.tokens[flat[ok]]
        cont = ok.copy()
        cont[ok] = self.has_next[flat[ok]]
        out[cont, self.m:] = self.tokens[flat[cont] + 1]
        return out.reshape(*ids.shape, 2 * self.m)


def window_chunks(inputs: np.ndarray, chunk_len: int) -> np.ndarray:
    """inputs [w, T] -> [w, ceil(T / C), C] chunks, the last one -1 padded when C does not divide T."""
    w, t = inputs.shape
    n = -(-t // chunk_len)
    padded = np.full((w, n * chunk_len), -1, dtype=np.int64)
    padded[:, :t] = inputs
    return padded.reshape(w, n, chunk_len)


def search_excluding(searcher: Searcher, queries: np.ndarray, excluded: np.ndarray, keys: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best corpus chunks of each query whose document key is not in its ``excluded`` row.

    queries [Q, d] float32; excluded [Q, E] int64 document keys. Returns (ids [Q, k] int64, -1 where
    fewer were found; inner products [Q, k] float32). Queries short of k after dropping are searched
    again, four times wider; where an IVF search ran out of candidates (the lists it probed hold
    little but the query's own document, e.g. a long file of similar lines) with four times the
    ``nprobe`` instead, until the whole index is covered.
    """
    nq = len(queries)
    ids = np.full((nq, k), -1, dtype=np.int64)
    sims = np.full((nq, k), -np.inf, dtype=np.float32)
    todo = np.arange(nq)
    ntotal, nlist = searcher.ntotal, searcher.nlist
    width = min(k + _FIRST_WIDTH, ntotal)
    nprobe = base = searcher.nprobe
    try:
        while len(todo):
            sim, found = searcher.search(queries[todo], width)
            ok = found >= 0
            ok[ok] = ~np.any(keys[found[ok]][:, None] == excluded[todo][np.nonzero(ok)[0]], axis=1)
            # stable: the index's order (best first) among the kept results
            order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
            kept = np.take_along_axis(ok, order, 1)
            ids[todo] = np.where(kept, np.take_along_axis(found, order, 1), -1)
            sims[todo] = np.where(kept, np.take_along_axis(sim, order, 1), -np.inf)
            short = kept.sum(1) < k
            exhausted = bool((found[short] < 0).any())
            if exhausted and nprobe < nlist:
                nprobe = min(nprobe * 4, nlist)
                searcher.set_nprobe(nprobe)
            elif width < ntotal:
                width = min(width * 4, ntotal)
            else:
                break
            todo = todo[short]
    finally:
        searcher.set_nprobe(base)
    return ids, sims


def find_neighbours(cfg: NeighboursConfig, progress: bool = True) -> dict[str, Any]:
    """Run the job; returns per split the windows, shards written and kept, and seconds."""
    t0 = time.perf_counter()
    reader = WindowReader(cfg.dataset)
    man = reader.manifest
    emb_root = f"{cfg.retrieval.rstrip('/')}/embeddings"
    emb = EmbeddingsManifest.load(emb_root)
    index, summary = load_index(cfg.retrieval)
    if summary["dim"] != emb.dim or summary["ntotal"] != emb.chunks:
        raise DataPrepError(f"{cfg.retrieval}/index: built for {summary['ntotal']} x {summary['dim']} embeddings, "
                            f"{emb_root} holds {emb.chunks} x {emb.dim}: run the index job again")
    device = resolve_device(cfg.device)
    searcher = Searcher(index, device)
    nprobe = cfg.nprobe or summary["nprobe"]
    searcher.set_nprobe(nprobe)
    embedder = make_embedder(emb.embedder, device=cfg.device)
    job = json.loads(json.dumps({
        "dataset_manifest_sha256": manifest_sha256(cfg.dataset), "index_sha256": summary["index_sha256"],
        "embeddings_sha256": summary["embeddings_sha256"], "chunk_len": cfg.chunk_len, "k": cfg.k,
        "nprobe": nprobe,
    }))
    fs, root = filesystem(cfg.out)
    root = root.rstrip("/")
    state = load_journal(fs, root, cfg.out, job, cfg.overwrite, MANIFEST_NAME,
                         {"splits": {s: [] for s in SPLITS}, "bos": {s: [0] for s in SPLITS}})
    corpus = Corpus(emb_root, emb, progress)
    n_chunks = -(-man.seq_len // cfg.chunk_len)
    stride = sample_bytes(n_chunks, cfg.k, 2 * emb.chunk_len)
    result: dict[str, Any] = {"out": cfg.out, "splits": {}, "nprobe": nprobe, "device": device}
    splits = {}
    for split in SPLITS:
        entry = man.split(split)
        done = [from_dict(NeighbourShard, s) for s in state["splits"][split]]
        kept = intact_prefix(fs, root, done)
        done, bos = done[:kept], state["bos"][split][:kept + 1] or [0]
        keys = document_keys(reader, split) if entry.windows else np.zeros(0, np.int64)
        bar = tqdm(total=entry.windows, initial=sum(s.windows for s in done), unit="win",
                   desc=f"neighbours {split}", disable=not progress)
        for s in range(kept, len(entry.shards)):
            first = reader.manifest.first_window(split, s)
            count = entry.shards[s].windows
            stream = reader.iter_windows(split, first)
            windows = np.stack([next(stream) for _ in range(count)]).astype(np.int64)
            stream.close()
            ids, dist, bos_count = _shard_neighbours(windows[:, :-1], bos[s], keys, man.bos_id, cfg, embedder,
                                                     searcher, corpus)
            data = pack_neighbour_shard(ids, dist, first)
            rel = f"{split}/shard-{s:06d}.tar"
            put_atomic(fs, f"{root}/{rel}", data)
            done.append(NeighbourShard(rel, count, len(data), hashlib.sha256(data).hexdigest()))
            # a stream's very last token (after its last window's inputs) may be the BOS of a listed document
            ends_stream = s + 1 == len(entry.shards) or not man.same_stream(split, s + 1)
            bos.append(bos[s] + bos_count + int(ends_stream and windows[-1, -1] == man.bos_id))
            state["splits"][split], state["bos"][split] = [to_dict(d) for d in done], bos
            save_journal(fs, root, state)
            bar.update(count)
        bar.close()
        splits[split] = NeighbourSplit(entry.windows, done)
        result["splits"][split] = {"windows": entry.windows, "shards": len(done), "kept_shards": kept}
    manifest = NeighbourManifest(
        FORMAT, FORMAT_VERSION, job["dataset_manifest_sha256"], man.seq_len, cfg.chunk_len, n_chunks, cfg.k,
        2 * emb.chunk_len, emb.chunk_len, man.windows_per_shard, stride, NeighbourSplits(**splits),
        index={"path": f"{cfg.retrieval.rstrip('/')}/index", "sha256": summary["index_sha256"],
               "kind": summary["kind"], "nprobe": nprobe, "recall_at_10": summary["recall_at_10"]},
        job=job)
    put_atomic(fs, f"{root}/{MANIFEST_NAME}", manifest.to_json().encode())
    result["seconds"] = time.perf_counter() - t0
    return result


def _shard_neighbours(inputs: np.ndarray, bos_before: int, keys: np.ndarray, bos_id: int, cfg: NeighboursConfig,
                      embedder, searcher: Searcher, corpus: Corpus) -> tuple[np.ndarray, np.ndarray, int]:
    """Neighbours of the windows ``inputs`` [w, T] of one shard, whose first token follows ``bos_before`` BOS.

    Returns ids int32 [w, n, K, 2m], distances float32 [w, n, K] and the BOS count of the inputs.
    """
    w, t = inputs.shape
    is_bos = (inputs == bos_id).reshape(-1)
    # document ordinal of every input token (the inputs of consecutive windows tile the stream)
    doc = (bos_before + np.cumsum(is_bos) - 1).reshape(w, t)
    if doc.min() < 0:
        raise DataPrepError("the token stream does not start with BOS")
    chunks = window_chunks(inputs, cfg.chunk_len)
    n = chunks.shape[1]
    doc_chunks = window_chunks(doc, cfg.chunk_len)
    first_doc = doc_chunks[:, :, 0].reshape(-1)
    last_doc = np.where(chunks >= 0, doc_chunks, -1).max(-1).reshape(-1)
    span = int((last_doc - first_doc).max()) + 1
    # the keys of every document a query chunk overlaps (repeating the last one to a fixed width)
    excluded = keys[np.minimum(first_doc[:, None] + np.arange(span), last_doc[:, None])]
    queries = embedder.embed(chunks.reshape(w * n, cfg.chunk_len))
    ids, sims = search_excluding(searcher, queries, excluded, corpus.keys, cfg.k)
    dist = np.where(ids >= 0, np.maximum(2.0 - 2.0 * sims, 0.0), np.inf).astype(np.float32)
    tokens = corpus.neighbour_tokens(ids).reshape(w, n, cfg.k, 2 * corpus.m)
    return tokens, dist.reshape(w, n, cfg.k), int(is_bos.sum())
