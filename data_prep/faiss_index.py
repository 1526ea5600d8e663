"""The ``retrieval index`` job: a FAISS index over the chunk embeddings, built per shard and merged.

Steps (each resumable: ``progress.json`` records what is done, with sha256s):
1. train: an empty index (IVF with flat lists, IVF with PQ codes, or exact flat; inner product on
   unit vectors = cosine) is trained on a seeded sample of the embeddings and saved as
   ``trained.faiss``;
2. add: for every embeddings shard, a copy of the trained index gets that shard's vectors under
   their global chunk ids (added in batches) and is saved as ``parts/part-NNNNNN.faiss``;
3. merge: the parts are merged into ``index.faiss`` (IVF: ``merge_from``, lists appended in chunk
   order, so the result does not depend on how many parts there were);
4. calibrate: held-out queries (a seeded sample of corpus chunks, each excluded from its own
   results) are searched exactly and with the index; ``nprobe`` is doubled until recall@10 reaches
   ``target_recall``, and the chosen ``nprobe`` and the measured recall go into ``index.json``.

Training and search run on GPUs with faiss-gpu when it sees CUDA devices (``device: auto``), and
on CPU with faiss-cpu otherwise; the index on disk is always the CPU form.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.chunks import EMBED_MANIFEST, EmbeddingsManifest, read_embedding_shard
from data_prep.storage import filesystem, intact_prefix, load_journal, put_atomic, save_journal
from zarvan_dist.config import ConfigError, from_dict, load_yaml, to_dict

INDEX_NAME = "index.faiss"
INDEX_MANIFEST = "index.json"
INDEX_FORMAT = "zarvan-faiss-index"
TRAINED_NAME = "trained.faiss"
RECALL_AT = 10


def import_faiss():
    """The faiss module, or an error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise DataPrepError("retrieval needs FAISS: pip install faiss-cpu (or faiss-gpu for CUDA), "
                            "or install this project with the [retrieval] extra") from None
    return faiss


@dataclass
class IndexConfig:
    """Settings of the ``retrieval index`` job (a YAML file of these keys may be given with --config)."""

    kind: Literal["ivf_flat", "ivf_pq", "flat"] = "ivf_flat"
    """ivf_flat: inverted lists of full vectors (exact scores; the default); ivf_pq: lists of PQ codes
    (pq_m bytes per vector at 8 bits instead of 4 x dim, approximate scores); flat: exact search."""
    nlist: int | None = None
    """Inverted lists; default 4 x sqrt(chunks), at most chunks / 39 (FAISS's training minimum)."""
    nprobe: int | None = None
    """Lists searched per query; default: the smallest power of two reaching ``target_recall``."""
    target_recall: float = 0.95
    """Recall@10 against exact search that the default ``nprobe`` is calibrated to reach."""
    calibration_queries: int = 1000
    """Held-out corpus chunks searched to calibrate ``nprobe`` and measure recall."""
    pq_m: int | None = None
    """ivf_pq: sub-quantizers (must divide the dimension); default dim / 4."""
    pq_bits: int = 8
    """ivf_pq: bits per sub-quantizer code."""
    train_size: int | None = None
    """Embeddings sampled to train the quantizers; default 64 x nlist (at least 39 x 2**pq_bits for PQ)."""
    seed: int = 0
    """Seed of the training sample, the k-means initialisation and the calibration queries."""
    add_batch: int = 65536
    """Vectors added to the index at once."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: GPUs when faiss-gpu sees them, else CPU."""

    def __post_init__(self) -> None:
        for name in ("nlist", "nprobe", "pq_m", "train_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}: expected a positive integer or null, got {v}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target_recall: expected a number in (0, 1], got {self.target_recall}")
        for name in ("calibration_queries", "add_batch", "pq_bits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> IndexConfig:
        data = load_yaml(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def resolve_device(device: str) -> str:
    """``cuda`` when asked for (or ``auto`` and faiss-gpu sees a GPU), else ``cpu``."""
    faiss = import_faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and gpus == 0:
        raise DataPrepError("--device cuda: this FAISS has no GPU support or sees no GPU (install faiss-gpu)")
    return "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"


GPU_MAX_K = 2048
"""faiss-gpu's largest k and nprobe of one search (GPU_MAX_SELECTION_K): larger ones go to the CPU form."""
GPU_SHARED_BYTES = 48 * 1024
"""Shared memory of a block that faiss-gpu lets an IVFPQ search's float32 lookup tables take."""


GPU_PQ_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
"""Sub-quantizer counts faiss-gpu's IVFPQ supports."""


def to_device(index, device: str):
    """The index itself on CPU; a GPU copy over every visible GPU for ``cuda``, or None where faiss-gpu
    cannot hold it (an IVFPQ index of other sub-quantizer counts or whose lookup tables exceed a block's
    shared memory even in float16): such an index is searched on the CPU.

    The copy is made with ``nprobe`` at most ``GPU_MAX_K`` (faiss-gpu refuses to copy more), and with
    float16 lookup tables for an IVFPQ index whose float32 tables (``pq_m`` x 2^bits x 4 bytes) exceed
    ``GPU_SHARED_BYTES``.
    """
    if device == "cpu":
        return index
    faiss = import_faiss()
    options = faiss.GpuMultipleClonerOptions()
    pq = getattr(index, "pq", None)
    if pq is not None:
        if pq.M not in GPU_PQ_SUBQUANTIZERS or pq.M * pq.ksub * 2 > GPU_SHARED_BYTES:
            print(f"note: faiss-gpu cannot search an IVFPQ index of {pq.M} sub-quantizers of {pq.nbits} bits; "
                  f"it is searched on the CPU (choose pq_m in {list(GPU_PQ_SUBQUANTIZERS)} for the GPU)")
            return None
        options.useFloat16 = pq.M * pq.ksub * 4 > GPU_SHARED_BYTES
    saved = getattr(index, "nprobe", None)
    if saved is not None:
        index.nprobe = min(saved, GPU_MAX_K)
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    finally:
        if saved is not None:
            index.nprobe = saved


def is_ivf(index) -> bool:
    """Whether ``index`` (or every replica inside it) is an IVF index, which has ``nprobe``."""
    faiss = import_faiss()
    if isinstance(index, faiss.IndexReplicas):
        return index.count() > 0 and all(is_ivf(faiss.downcast_index(index.at(i))) for i in range(index.count()))
    return hasattr(index, "nprobe")


def set_nprobe(index, nprobe: int | None, space=None) -> None:
    """Lists searched per query (no-op for a flat index), set through FAISS's ``ParameterSpace``
    (``space``: a ``GpuParameterSpace`` for GPU copies), which reaches the IVF index inside replicas too."""
    if nprobe is not None and is_ivf(index):
        (space or import_faiss().ParameterSpace()).set_index_parameter(index, "nprobe", int(nprobe))


class Searcher:
    """A built index (its CPU form) searched on the CPU, or on every visible GPU for ``cuda``.

    Both devices answer every search: one that faiss-gpu cannot run (k or nprobe above ``max_k``)
    goes to the CPU form, which holds the same vectors and the same ``nprobe``, and so does every
    search of an index faiss-gpu cannot hold (``to_device`` gives None). ``device_index`` replaces the
    GPU copy (tests stand a CPU ``IndexReplicas`` in for the GPUs).
    """

    def __init__(self, index, device: str = "cpu", device_index=None, max_k: int = GPU_MAX_K) -> None:
        self.index = index
        self.nlist = getattr(index, "nlist", 1)
        self.nprobe = getattr(index, "nprobe", 1)
        self.max_k = max_k
        if device_index is None and device != "cpu":
            device_index = to_device(index, device)
        self.device_index = device_index
        self._space = None
        if device_index is not None:
            faiss = import_faiss()
            # GpuParameterSpace exists in faiss-gpu builds only (tests stand CPU replicas in for GPUs)
            self._space = getattr(faiss, "GpuParameterSpace", faiss.ParameterSpace)()
            self.set_nprobe(self.nprobe)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_nprobe(self, nprobe: int | None) -> None:
        """Lists searched per query from now on (a flat index has none)."""
        if nprobe is None or not is_ivf(self.index):
            return
        self.nprobe = int(nprobe)
        set_nprobe(self.index, self.nprobe)
        if self.device_index is not None:
            set_nprobe(self.device_index, min(self.nprobe, self.max_k), self._space)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, ids [Q, k] int64, -1 where fewer were found), best first."""
        on_device = self.device_index is not None and k <= self.max_k and self.nprobe <= self.max_k
        return (self.device_index if on_device else self.index).search(queries, k)


def serialize(index) -> bytes:
    return import_faiss().serialize_index(index).tobytes()


def deserialize(data: bytes):
    return import_faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def default_nlist(chunks: int) -> int:
    """4 sqrt(N) lists, but no more than N / 39 (k-means needs 39 training points per list)."""
    return max(1, min(int(round(4 * math.sqrt(chunks))), chunks // 39))


def empty_index(cfg: IndexConfig, dim: int, nlist: int):
    faiss = import_faiss()
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(dim)
    quantizer = faiss.IndexFlatIP(dim)
    if cfg.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        pq_m = cfg.pq_m or max(1, dim // 4)
        if dim % pq_m:
            raise ConfigError(f"pq_m: {pq_m} does not divide the embedding dimension {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, cfg.pq_bits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = cfg.seed
    index.own_fields = True
    quantizer.this.disown()
    return index


def sample_rows(root: str, manifest: EmbeddingsManifest, rows: np.ndarray) -> np.ndarray:
    """The embeddings of global chunk ids ``rows`` (sorted), read shard by shard."""
    out = np.empty((len(rows), manifest.dim), dtype=np.float32)
    for shard in manifest.shards:
        lo, hi = np.searchsorted(rows, [shard.first_chunk, shard.first_chunk + shard.chunks])
        if hi > lo:
            out[lo:hi] = read_embedding_shard(root, shard)["embeddings"][rows[lo:hi] - shard.first_chunk]
    return out


def exact_top(root: str, manifest: EmbeddingsManifest, queries: np.ndarray, exclude: np.ndarray | None,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top ``k`` (scores, ids) over all embeddings, streamed shard by shard;
    ``exclude[i]`` (a chunk id, or -1) is left out of query i's results. Ties go to the smaller id."""
    nq = len(queries)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for shard in manifest.shards:
        x = read_embedding_shard(root, shard)["embeddings"]
        for a in range(0, len(x), 16384):
            scores = queries @ x[a:a + 16384].T
            ids = shard.first_chunk + a + np.arange(scores.shape[1])
            if exclude is not None:
                scores[exclude[:, None] == ids[None, :]] = -np.inf
            if scores.shape[1] > k:  # this block's k best (in any order), then merge with the best so far
                top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores, block_ids = np.take_along_axis(scores, top, 1), ids[top]
            else:
                block_ids = np.broadcast_to(ids, scores.shape)
            s = np.concatenate([best_s, scores], axis=1)
            i = np.concatenate([best_i, block_ids], axis=1)
            order = np.stack([np.lexsort((i[q], -s[q]))[:k] for q in range(nq)])
            best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_s, best_i


def recall_at(found: np.ndarray, exact_scores: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_AT,
              tol: float = 1e-5) -> float:
    """Recall@k of ``found`` ids [Q, >=k] against an exact top list [Q, >=k] (longer lists are fine).

    A found id counts when it is in the exact list with a score at least the exact k-th best minus
    ``tol``: among chunks tied with the k-th (duplicated text), any one is a right answer.
    """
    hits = 0
    for q in range(len(found)):
        kth = exact_scores[q, k - 1]
        good = {int(i) for i, s in zip(exact_ids[q], exact_scores[q]) if s >= kth - tol and i >= 0}
        hits += sum(int(i) in good for i in found[q, :k])
    return hits / (k * len(found))


@dataclass
class IndexSummary:
    """What ``index.json`` records."""

    format: str
    kind: str
    dim: int
    ntotal: int
    nlist: int
    nprobe: int | None
    recall_at_10: float | None
    calibration_queries: int
    train_size: int
    embeddings_sha256: str
    index_sha256: str
    index_bytes: int
    device: str
    seconds: dict[str, float]
    config: dict[str, Any]


def build_index(retrieval: str, cfg: IndexConfig, progress: bool = True) -> IndexSummary:
    """Run the ``index`` job on the embeddings in ``retrieval/embeddings``; writes ``retrieval/index``."""
    faiss = import_faiss()
    emb_root = f"{retrieval.rstrip('/')}/embeddings"
    manifest = EmbeddingsManifest.load(emb_root)
    n, dim = manifest.chunks, manifest.dim
    if n == 0:
        raise DataPrepError(f"{emb_root}: no chunks to index")
    device = resolve_device(cfg.device)
    nlist = 1 if cfg.kind == "flat" else cfg.nlist or default_nlist(n)
    if cfg.kind != "flat" and nlist > n:
        raise ConfigError(f"nlist: {nlist} lists for {n} chunks; use at most {n}")
    min_train = 39 * (1 << cfg.pq_bits) if cfg.kind == "ivf_pq" else 0
    train_size = min(n, cfg.train_size or max(64 * nlist, min_train))
    emb_fs, emb_path = filesystem(emb_root)
    emb_sha = hashlib.sha256(emb_fs.cat_file(f"{emb_path.rstrip('/')}/{EMBED_MANIFEST}")).hexdigest()
    job = json.loads(json.dumps({"embeddings_sha256": emb_sha, "config": {**to_dict(cfg), "device": None},
                                 "nlist": nlist, "train_size": train_size}))
    out = f"{retrieval.rstrip('/')}/index"
    fs, root = filesystem(out)
    root = root.rstrip("/")
    # an index of other settings is replaced without --overwrite: it is derived data, rebuilt from the embeddings
    state = load_journal(fs, root, out, job, overwrite=True, manifest_name=INDEX_MANIFEST, fresh={"parts": []})
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    trained_bytes = fs.cat_file(f"{root}/{TRAINED_NAME}") if state.get("trained_sha256") and fs.exists(
        f"{root}/{TRAINED_NAME}") else None
    if trained_bytes is None or hashlib.sha256(trained_bytes).hexdigest() != state["trained_sha256"]:
        index = empty_index(cfg, dim, nlist)
        if cfg.kind != "flat":
            rows = np.sort(np.random.default_rng([cfg.seed, 0]).choice(n, train_size, replace=False)) if train_size < n else np.arange(n)
            x = sample_rows(emb_root, manifest, rows)
            if progress:
                print(f"training {cfg.kind} (nlist {nlist}) on {len(x):,} of {n:,} embeddings on {device}")
            # k-means runs on the CPU index object (its seeded initialisation) with the assignment
            # step on the device's flat index, so CPU and GPU train the same coarse quantizer
            assign = to_device(faiss.IndexFlatIP(dim), device)  # referenced here: FAISS does not own it
            index.clustering_index = assign
            try:
                index.train(x)
            finally:
                index.clustering_index = None
        trained_bytes = serialize(index)
        put_atomic(fs, f"{root}/{TRAINED_NAME}", trained_bytes)
        state = {"job": job, "trained_sha256": hashlib.sha256(trained_bytes).hexdigest(), "parts": []}
        save_journal(fs, root, state)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    parts = [dict(p) for p in state["parts"]]
    kept = intact_prefix(fs, root, [_Part(p["path"], p["sha256"]) for p in parts])
    parts = parts[:kept]
    for k, shard in enumerate(tqdm(manifest.shards, desc="add", unit="shard", disable=not progress)):
        if k < kept:
            continue
        part = deserialize(trained_bytes)
        x = read_embedding_shard(emb_root, shard, check=True)["embeddings"]
        for a in range(0, len(x), cfg.add_batch):
            ids = shard.first_chunk + a + np.arange(min(cfg.add_batch, len(x) - a), dtype=np.int64)
            if cfg.kind == "flat":
                part.add(x[a:a + cfg.add_batch])
            else:
                part.add_with_ids(x[a:a + cfg.add_batch], ids)
        data = serialize(part)
        rel = f"parts/part-{k:06d}.faiss"
        put_atomic(fs, f"{root}/{rel}", data)
        parts.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "ntotal": int(part.ntotal)})
        state["parts"] = parts
        save_journal(fs, root, state)
    seconds["add"] = time.perf_counter() - t

    t = time.perf_counter()
    index = deserialize(trained_bytes)
    for p in tqdm(parts, desc="merge", unit="part", disable=not progress):
        part = deserialize(fs.cat_file(f"{root}/{p['path']}"))
        if cfg.kind == "flat":
            index.add(part.reconstruct_n(0, part.ntotal))
        else:
            index.merge_from(part, 0)
    if index.ntotal != n:
        raise DataPrepError(f"{out}: merged index holds {index.ntotal} vectors, the embeddings {n}")
    seconds["merge"] = time.perf_counter() - t

    t = time.perf_counter()
    nq = min(cfg.calibration_queries, n)
    qrows = np.sort(np.random.default_rng([cfg.seed, 1]).choice(n, nq, replace=False))
    queries = sample_rows(emb_root, manifest, qrows)
    exact_s, exact_i = exact_top(emb_root, manifest, queries, qrows, 4 * RECALL_AT)
    searcher = Searcher(index, device)
    nprobe, recall = cfg.nprobe, None
    candidates = [cfg.nprobe] if cfg.nprobe or cfg.kind == "flat" else \
        sorted({min(2 ** e, nlist) for e in range(math.ceil(math.log2(nlist)) + 1)})
    for nprobe in candidates:
        searcher.set_nprobe(nprobe)
        _, found = searcher.search(queries, RECALL_AT + 1)
        found = np.stack([[i for i in row if i != q][:RECALL_AT] for row, q in zip(found, qrows)])
        recall = recall_at(found, exact_s, exact_i)
        if progress:
            print(f"  nprobe {nprobe}: recall@{RECALL_AT} {recall:.3f}")
        if recall >= cfg.target_recall:
            break
    if cfg.kind == "flat":
        nprobe = None
    elif recall < cfg.target_recall:
        print(f"warning: recall@{RECALL_AT} {recall:.3f} stays below target_recall {cfg.target_recall} "
              f"(nprobe {nprobe} of {nlist} lists; ivf_pq codes cap it: use ivf_flat or more pq_m)")
    set_nprobe(index, nprobe)
    seconds["calibrate"] = time.perf_counter() - t

    data = serialize(index)
    put_atomic(fs, f"{root}/{INDEX_NAME}", data)
    summary = IndexSummary(INDEX_FORMAT, cfg.kind, dim, int(index.ntotal), nlist, nprobe, recall, nq, train_size,
                           emb_sha, hashlib.sha256(data).hexdigest(), len(data), device,
                           {k: round(v, 3) for k, v in seconds.items()}, to_dict(cfg))
    put_atomic(fs, f"{root}/{INDEX_MANIFEST}", (json.dumps(to_dict(summary), indent=2) + "\n").encode())
    return summary


@dataclass
class _Part:
    path: str
    sha256: str


def load_index(retrieval: str) -> tuple[Any, dict[str, Any]]:
    """The built index (CPU form, ``nprobe`` set) and its ``index.json``."""
    root = f"{retrieval.rstrip('/')}/index"
    fs, path = filesystem(root)
    path = path.rstrip("/")
    try:
        summary = json.loads(fs.cat_file(f"{path}/{INDEX_MANIFEST}"))
        data = fs.cat_file(f"{path}/{INDEX_NAME}")
    except FileNotFoundError:
        raise DataPrepError(f"{root}: no index (run `python -m data_prep retrieval index` first)") from None
    if hashlib.sha256(data).hexdigest() != summary["index_sha256"]:
        raise DataPrepError(f"{root}/{INDEX_NAME}: sha256 does not match {INDEX_MANIFEST}")
    index = deserialize(data)
    set_nprobe(index, summary["nprobe"])
    return index, summary
