"""The ``shards`` job: documents -> one token stream per split -> windows -> WebDataset shards.

Documents are shuffled with ``seeded_permutation`` and sent to ``val`` when the first 8 bytes of
their sha256, read as a fraction of 2**64, fall below ``val_fraction`` (so a document's split
never depends on the seed or on the rest of the corpus). Each split's stream is its documents'
tokens, each document led by BOS; window i is ``stream[i * seq_len : i * seq_len + seq_len + 1]``.
The last ``tail_tokens`` tokens of a stream, fewer than a window, are not written and are counted
in the manifest and the summary.

Resuming: after each shard is renamed into place, ``progress.json`` records it with the document
and token offset where the next shard begins. A re-run with the same configuration checks the
recorded shards' sha256, keeps the good prefix, and starts tokenizing again at that point, so it
ends with the same bytes as a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.corpus import CorpusConfig, CorpusStats, Document, read_corpus, seeded_permutation
from data_prep.storage import PROGRESS_NAME, filesystem, put_atomic, read_journal, save_journal
from zarvan_dist.config import ConfigError, from_dict, to_dict
from zarvan_dist.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ShardEntry,
    SplitEntry,
    Splits,
    TokenizerEntry,
    dtype_for_vocab,
)
from zarvan_dist.data.shards import pack_shard, sample_bytes
from zarvan_dist.tokenizer import encode_documents, load_tokenizer

TOKENIZER_NAME = "tokenizer.model"
# Default shard size: about 2**25 tokens (64 MiB at uint16).
SHARD_TOKENS = 1 << 25
# Documents sent to a worker per task: enough text that pickling costs little against encoding.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 4096
# With several workers, batches shrink towards the end (down to this size) so that no worker
# idles while another finishes a large last batch; a small split is spread over all workers.
_MIN_BATCH_CHARS = 1 << 16


@dataclass
class ShardsConfig:
    """Settings of the ``shards`` job."""

    tokenizer: str
    """fsspec URL of the sentencepiece model."""
    out: str
    """fsspec URL of the dataset directory."""
    seq_len: int
    """Tokens per training window; each stored window has seq_len + 1."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Documents to write."""
    workers: int = 1
    """Tokenizer processes (1: tokenize in the job's own process). Output does not depend on it."""
    seed: int = 0
    """Seed of the document shuffle."""
    val_fraction: float = 0.01
    """Expected fraction of documents in the val split; 0 for no val split."""
    windows_per_shard: int | None = None
    """Windows per shard; None picks about 2**25 tokens per shard."""
    overwrite: bool = False
    """Replace a dataset or unfinished run of another configuration at ``out``."""

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ConfigError(f"seq_len: expected a positive integer, got {self.seq_len}")
        if self.workers < 1:
            raise ConfigError(f"workers: expected a positive integer, got {self.workers}")
        if self.seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {self.seed}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected a number in [0, 1), got {self.val_fraction}")
        if self.windows_per_shard is None:
            self.windows_per_shard = max(1, SHARD_TOKENS // (self.seq_len + 1))
        if self.windows_per_shard < 1:
            raise ConfigError(f"windows_per_shard: expected a positive integer, got {self.windows_per_shard}")


@dataclass
class SplitTotals:
    """A finished split's stream."""

    tokens: int
    """Tokens in the stream."""
    windows: int
    """Windows written."""
    tail_tokens: int
    """Tokens after the last window, not written."""


@dataclass
class SplitProgress:
    """How far a split's shards are written."""

    shards: list[ShardEntry] = field(default_factory=list)
    """Shards renamed into place, in order."""
    starts: list[list[int]] = field(default_factory=lambda: [[0, 0]])
    """starts[k] = [document index, token offset in it] where shard k's first window begins;
    while the split is unfinished it has one more entry: where the next shard begins."""
    finished: SplitTotals | None = None
    """Set once the split's last shard is written."""


@dataclass
class Progress:
    """Contents of ``progress.json``, the job's resume journal (readers ignore it)."""

    job: dict[str, Any]
    """The configuration that wrote the shards."""
    train: SplitProgress = field(default_factory=SplitProgress)
    """Progress of the train split."""
    val: SplitProgress = field(default_factory=SplitProgress)
    """Progress of the val split."""


def split_documents(docs: list[Document], seed: int, val_fraction: float) -> dict[str, list[Document]]:
    """The shuffled documents of each split (``train``, ``val``)."""
    threshold = val_fraction * 2.0**64
    out: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for i in seeded_permutation(len(docs), seed):
        doc = docs[i]
        out["val" if int.from_bytes(doc.sha256[:8], "big") < threshold else "train"].append(doc)
    return out


def corpus_sha256(docs: list[Document]) -> str:
    """Fingerprint of the documents in input order: their sources and text hashes."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(f"{doc.source}\0{doc.line}\0".encode())
        h.update(doc.sha256)
    return h.hexdigest()


def write_shards(cfg: ShardsConfig, progress: bool = True) -> dict:
    """Run the job: read, shuffle, split, tokenize, write shards, documents lists and manifest.

    Returns a summary: per split documents/tokens/windows/shards/tail_tokens and how many shards
    were kept from an earlier run, the corpus stats, tokens encoded by this run and seconds.
    """
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer)
    sp, model = tokenizer.processor, tokenizer.data
    vocab_size = tokenizer.vocab_size
    dtype = dtype_for_vocab(vocab_size)
    docs, stats = read_corpus(cfg.corpus, progress)
    splits = split_documents(docs, cfg.seed, cfg.val_fraction)
    if not splits["train"]:
        raise DataPrepError(f"no training documents ({stats.description}; skipped: {stats.skipped})")
    if cfg.val_fraction > 0 and not splits["val"]:
        raise DataPrepError(
            f"--val-fraction {cfg.val_fraction} put none of the {len(docs)} documents in val: "
            f"raise it, or pass 0 for no val split"
        )
    # Round-tripped through JSON so that it compares equal to the copy an earlier run recorded.
    job = json.loads(json.dumps({
        "corpus": to_dict(cfg.corpus),
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "seq_len": cfg.seq_len,
        "windows_per_shard": cfg.windows_per_shard,
        "tokenizer_sha256": tokenizer.sha256,
        "corpus_sha256": corpus_sha256(docs),
    }))
    fs, root = filesystem(cfg.out)
    writer = _Writer(fs, root.rstrip("/"), cfg.out.rstrip("/"), cfg.seq_len, cfg.windows_per_shard, dtype, progress)
    state = writer.load_progress(job, cfg.overwrite)
    summary: dict[str, Any] = {"output": cfg.out, "corpus": stats, "splits": {}}
    encoded = 0
    with _encoder(model, dtype, cfg.workers) as encode:
        # val first: it is small, so a split too short for one window is reported at once.
        for name in ("val", "train"):
            kept, n = writer.write_split(name, splits[name], state, encode)
            encoded += n
            summary["splits"][name] = {"kept_shards": kept}
    manifest = writer.finish(state, splits, sp, model, cfg.tokenizer, stats)
    for name in SPLITS:
        entry = manifest.split(name)
        summary["splits"][name].update(
            documents=entry.documents, tokens=entry.tokens, windows=entry.windows,
            shards=len(entry.shards), tail_tokens=entry.tail_tokens,
        )
    summary["tokens_encoded"] = encoded
    summary["seconds"] = time.perf_counter() - start
    return summary


# Worker-process state: the tokenizer is loaded once per process by the pool initializer.
_worker: tuple[spm.SentencePieceProcessor, str] | None = None


def _init_worker(model: bytes, dtype: str) -> None:
    global _worker
    _worker = (spm.SentencePieceProcessor(model_proto=model), dtype)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    sp, dtype = _worker
    return encode_documents(sp, texts, dtype)


@contextlib.contextmanager
def _encoder(model: bytes, dtype: str, workers: int) -> Iterator[Callable]:
    """A function mapping a list of documents to their (tokens, lengths) per batch, in order.

    Results are taken in submission order, so the output does not depend on which worker
    finishes first; at most two batches per worker are in flight, which bounds memory.
    """
    if workers == 1:
        _init_worker(model, dtype)
        yield lambda docs: map(_encode_batch, document_batches(docs))
        return
    # concurrent.futures, not multiprocessing.Pool: when a worker dies (the OOM killer, a
    # signal) the pending results raise BrokenProcessPool instead of waiting forever
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(model, dtype)) as pool:
        def ordered(docs: list[Document]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            pending: deque = deque()
            try:
                for batch in document_batches(docs, workers):
                    pending.append(pool.submit(_encode_batch, batch))
                    if len(pending) >= 2 * workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            except BrokenProcessPool:
                raise DataPrepError(
                    "a tokenizer worker process died (killed by the system, e.g. out of memory?); "
                    "re-run the same command to resume from the last complete shard"
                ) from None

        yield ordered


def document_batches(docs: list[Document], workers: int = 1) -> Iterator[list[str]]:
    """The documents' texts in order, grouped into encoding tasks of up to about 1M characters.

    With several workers a batch holds at most 1/(4 * workers) of the characters still to come
    (but at least 64K), so the last batches are small and every worker stays busy to the end.
    """
    remaining = sum(len(doc.text) for doc in docs) if workers > 1 else 0
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc.text)
        chars += len(doc.text)
        limit = _BATCH_CHARS
        if workers > 1:
            limit = min(_BATCH_CHARS, max(_MIN_BATCH_CHARS, remaining // (4 * workers)))
        if chars >= limit or len(batch) >= _BATCH_DOCS:
            yield batch
            remaining -= chars
            batch, chars = [], 0
    if batch:
        yield batch


class _Writer:
    """Writes one dataset directory: shards, journal, documents lists, tokenizer copy, manifest."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, seq_len: int,
                 windows_per_shard: int, dtype: str, progress: bool):
        self.fs, self.root, self.url = fs, root, url
        self.seq_len, self.windows_per_shard, self.dtype = seq_len, windows_per_shard, dtype
        self.progress = progress

    def put(self, rel: str, data: bytes) -> None:
        put_atomic(self.fs, f"{self.root}/{rel}", data)

    def load_progress(self, job: dict[str, Any], overwrite: bool) -> Progress:
        """The journal of an earlier run of this configuration, or a fresh one.

        A manifest or journal of another configuration is refused, or removed under ``overwrite``.
        """
        journal = read_journal(self.fs, self.root)
        recorded = {MANIFEST_NAME: self._manifest_job(),
                    PROGRESS_NAME: None if journal is None else journal.get("job", {})}
        for name, old in recorded.items():
            if old is not None and old != job:
                if not overwrite:
                    diff = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
                    raise DataPrepError(
                        f"{self.url}/{name} was written by another configuration (differs in: "
                        f"{', '.join(diff)}); pass --overwrite to replace that dataset"
                    )
                self._remove_dataset()
                return Progress(job=job)
        return from_dict(Progress, journal) if journal is not None else Progress(job=job)

    def _manifest_job(self) -> dict[str, Any] | None:
        """The ``job`` of a manifest in the directory ({} where it records none), or None without a manifest."""
        path = f"{self.root}/{MANIFEST_NAME}"
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))["job"]
        except (ValueError, KeyError, TypeError):
            return {}

    def _remove_dataset(self) -> None:
        for name in (MANIFEST_NAME, PROGRESS_NAME, TOKENIZER_NAME, *SPLITS):
            path = f"{self.root}/{name}"
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def _intact(self, shard: ShardEntry) -> bool:
        path = f"{self.root}/{shard.path}"
        try:
            if self.fs.size(path) != shard.bytes:
                return False
            return hashlib.sha256(self.fs.cat_file(path)).hexdigest() == shard.sha256
        except FileNotFoundError:
            return False

    def write_split(self, name: str, docs: list[Document], state: Progress,
                    encode: Callable) -> tuple[int, int]:
        """Write the shards of one split from where ``state`` left off.

        Returns (shards kept from an earlier run, tokens encoded now). Updates ``state`` and the
        journal after every shard.
        """
        split: SplitProgress = getattr(state, name)
        kept = 0
        while kept < len(split.shards) and self._intact(split.shards[kept]):
            kept += 1
        if split.finished is not None and kept == len(split.shards):
            return kept, 0
        if not docs:
            setattr(state, name, SplitProgress(starts=[], finished=SplitTotals(0, 0, 0)))
            return 0, 0
        first_doc, skip = split.starts[kept]
        split = SplitProgress(shards=split.shards[:kept], starts=split.starts[:kept + 1])
        setattr(state, name, split)
        self.fs.makedirs(f"{self.root}/{name}", exist_ok=True)

        L, W = self.seq_len, self.windows_per_shard
        span = W * L                 # stream tokens a full shard advances by
        pos = kept * span            # stream index of the first buffered token
        end = pos - skip             # stream index just past the last token received
        chunks: list[np.ndarray] = []
        doc_ids = np.zeros(0, np.int64)      # documents that may still hold a future shard start
        doc_starts = np.zeros(0, np.int64)   # ... and their stream index
        encoded = 0
        clock = time.perf_counter()
        bar = tqdm(total=len(docs), initial=first_doc, unit="doc", desc=name, disable=not self.progress)
        next_doc = first_doc
        for tokens, lengths in encode(docs[first_doc:]):
            starts = end + np.concatenate(([0], np.cumsum(lengths)[:-1]))
            doc_ids = np.concatenate((doc_ids, np.arange(next_doc, next_doc + len(lengths))))
            doc_starts = np.concatenate((doc_starts, starts))
            next_doc += len(lengths)
            chunks.append(tokens[max(0, pos - end):])
            end += len(tokens)
            encoded += len(tokens)
            bar.update(len(lengths))
            bar.set_postfix(tokens=encoded, tok_s=f"{encoded / (time.perf_counter() - clock):,.0f}")
            if end - pos < span + 1:
                continue
            buf = np.concatenate(chunks)
            while len(buf) >= span + 1:
                self._put_shard(name, split, buf[:span + 1], W)
                buf, pos = buf[span:], pos + span
                j = int(np.searchsorted(doc_starts, pos, side="right")) - 1
                doc_ids, doc_starts = doc_ids[j:], doc_starts[j:]
                split.starts.append([int(doc_ids[0]), int(pos - doc_starts[0])])
                self._save(state)
            chunks = [buf.copy()]
        bar.close()

        buf = np.concatenate(chunks) if chunks else np.zeros(0, self.dtype)
        n = (len(buf) - 1) // L if len(buf) > L else 0
        if n == 0 and not split.shards:
            hint = ", or a larger --val-fraction" if name == "val" else ""
            raise DataPrepError(
                f"the {name} split holds {len(buf)} tokens in {len(docs)} documents, fewer than "
                f"one window of seq_len + 1 = {L + 1} tokens: use more input or a smaller --seq-len{hint}"
            )
        full_shards = len(split.shards)
        if n:
            self._put_shard(name, split, buf[:n * L + 1], n)
        else:
            split.starts.pop()
        split.finished = SplitTotals(tokens=end, windows=full_shards * W + n, tail_tokens=len(buf) - n * L - 1)
        self._save(state)
        return kept, encoded

    def _put_shard(self, name: str, split: SplitProgress, stream: np.ndarray, n: int) -> None:
        """Write shard ``len(split.shards)`` holding the n windows of ``stream`` (n * seq_len + 1 tokens)."""
        L = self.seq_len
        k = len(split.shards)
        windows = np.lib.stride_tricks.sliding_window_view(stream, L + 1)[::L]
        data = pack_shard(windows, k * self.windows_per_shard)
        entry = ShardEntry(path=f"{name}/shard-{k:06d}.tar", windows=n, tokens=n * (L + 1),
                           bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        self.put(entry.path, data)
        split.shards.append(entry)

    def _save(self, state: Progress) -> None:
        save_journal(self.fs, self.root, to_dict(state))

    def finish(self, state: Progress, splits: dict[str, list[Document]], sp: spm.SentencePieceProcessor,
               model: bytes, tokenizer_url: str, stats: CorpusStats) -> Manifest:
        """Write the documents lists, the tokenizer copy and, last, the manifest."""
        entries = {}
        for name in SPLITS:
            lines = "".join(
                json.dumps({"source": d.source, "line": d.line, "sha256": d.sha256.hex()}) + "\n"
                for d in splits[name]
            ).encode()
            rel = f"{name}/documents.jsonl"
            self.put(rel, lines)
            progress: SplitProgress = getattr(state, name)
            entries[name] = SplitEntry(
                documents=len(splits[name]), tokens=progress.finished.tokens,
                windows=progress.finished.windows, tail_tokens=progress.finished.tail_tokens,
                documents_path=rel, documents_sha256=hashlib.sha256(lines).hexdigest(),
                shards=progress.shards,
            )
        self.put(TOKENIZER_NAME, model)
        manifest = Manifest(
            format=FORMAT, version=FORMAT_VERSION, seq_len=self.seq_len,
            vocab_size=sp.get_piece_size(), dtype=self.dtype, bos_id=sp.bos_id(), eos_id=sp.eos_id(),
            pad_id=sp.pad_id(), unk_id=sp.unk_id(),
            tokenizer=TokenizerEntry(path=TOKENIZER_NAME, sha256=hashlib.sha256(model).hexdigest(),
                                     source=tokenizer_url),
            windows_per_shard=self.windows_per_shard, sample_bytes=sample_bytes(self.seq_len, self.dtype),
            splits=Splits(**entries), corpus=to_dict(stats), job=state.job,
        )
        self.put(MANIFEST_NAME, manifest.to_json().encode())
        for directory in ("", *(f"/{name}" for name in SPLITS)):
            for path in self.fs.ls(self.root + directory, detail=False):
                if path.endswith(".tmp"):
                    self.fs.rm(path)
        return manifest
