"""The ``shards`` job: documents -> tasks -> one token stream per task and split -> windows -> shards.

**Tasks.** The inputs are cut into pieces (``data_prep.corpus.plan_pieces``: whole files, byte ranges
of large JSON-lines files, row-group ranges of parquet files), the pieces shuffled with the seed
(``seeded_permutation``) and dealt to ``num_tasks`` tasks as contiguous runs of about equal bytes.
A task is a pure function of (inputs, configuration, its index): it streams its pieces' documents
through a bounded shuffle buffer, sends each to ``val`` when the first 8 bytes of its sha256, read as
a fraction of 2**64, fall below ``val_fraction`` (so a document's split never depends on the seed,
the tasks or the rest of the corpus), encodes them (``workers`` processes, results in order) and
cuts each split's stream -- its documents' tokens, each led by BOS -- into windows
(``stream[i * seq_len : i * seq_len + seq_len + 1]``) and shards of ``windows_per_shard`` windows.
A task's stream ends at its last whole window: the tokens after it (fewer than a window) are
counted, not written. The task writes, under ``OUT/tasks/TTTTT/``::

    train/shard-000000.tar ...   its windows of each split (format version 2: key ``TTTTT-WWWWWWWWWWWW``,
    val/shard-000000.tar ...     the tokens and their CRC-32; see zarvan_dist.data.shards)
    train/documents.jsonl        its documents of each split in stream order: source, offset, sha256
    val/documents.jsonl
    task.json                    written last: the job, what the task read, every file's size and sha256

**Merge.** Once every task has its ``task.json``, the merge writes ``OUT/tokenizer.model``, each
split's ``OUT/SPLIT/documents.jsonl`` (the tasks' lists in task order) and, last,
``OUT/manifest.json`` listing every task's shards in task order. A missing task stops the merge,
named. The dataset's bytes depend on the inputs, the configuration and ``num_tasks`` only: not on
the workers, on the machines, or on the order in which tasks ran or finished.

**Resuming.** A task whose ``task.json`` records this job and whose files match it is kept; any other
task (never run, killed, damaged) is written again from its start, which gives the same bytes.

**Memory** is bounded per task: the shuffle buffer (``shuffle_buffer`` documents), a few encoding
batches per worker, one shard's worth of tokens per split and one read block; not the corpus size.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.corpus import CorpusConfig, CorpusStats, Document, Piece, iter_documents, plan_pieces, seeded_permutation
from data_prep.storage import PROGRESS_NAME, filesystem, put_atomic, put_stream_atomic
from zarvan_dist.config import ConfigError, from_dict, to_dict
from zarvan_dist.data.hashing import splitmix64_outputs
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
from zarvan_dist.data.shards import sample_bytes, shard_blocks
from zarvan_dist.tokenizer import encode_documents, load_tokenizer

TOKENIZER_NAME = "tokenizer.model"
TASKS_DIR = "tasks"
TASK_RECORD = "task.json"
DOCUMENTS_NAME = "documents.jsonl"
# Default shard size: about 2**25 tokens (64 MiB at uint16).
SHARD_TOKENS = 1 << 25
# Documents sent to a worker per batch: enough text that pickling costs little against encoding.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 4096


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
    """Tokenizer processes per task (1: tokenize in the task's own process). Output does not depend on it."""
    seed: int = 0
    """Seed of the piece shuffle and of each task's shuffle buffer."""
    val_fraction: float = 0.01
    """Expected fraction of documents in the val split; 0 for no val split."""
    windows_per_shard: int | None = None
    """Windows per shard; None picks about 2**25 tokens per shard."""
    num_tasks: int = 1
    """Tasks the job is split into; the output depends on it (and not on where or in which order they run)."""
    shuffle_buffer: int = 4096
    """Documents a task holds to shuffle its stream (0 or 1: no shuffle within a task)."""
    piece_bytes: int = 256 << 20
    """Large inputs are cut into pieces of about this many bytes (see ``data_prep.corpus.plan_pieces``)."""
    overwrite: bool = False
    """Replace a dataset, or tasks, written by another configuration at ``out``."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "workers", "num_tasks", "piece_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("seed", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a non-negative integer, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected a number in [0, 1), got {self.val_fraction}")
        if self.windows_per_shard is None:
            self.windows_per_shard = max(1, SHARD_TOKENS // (self.seq_len + 1))
        if self.windows_per_shard < 1:
            raise ConfigError(f"windows_per_shard: expected a positive integer, got {self.windows_per_shard}")
        if self.corpus.max_docs is not None and self.num_tasks > 1:
            raise ConfigError("max_docs: counts the documents of one stream; use it with num_tasks 1")


@dataclass
class TaskSplit:
    """One split of one task: its stream, shards and documents list."""

    documents: int
    tokens: int
    """Tokens in the task's stream of the split (BOS included)."""
    windows: int
    tail_tokens: int
    """Tokens after the last whole window: counted, not written."""
    tail_documents: int
    """Documents that start in the tail: counted, not listed."""
    documents_path: str
    documents_sha256: str
    shards: list[ShardEntry] = field(default_factory=list)


@dataclass
class TaskRecord:
    """``OUT/tasks/TTTTT/task.json``: a finished task (written after its every other file)."""

    job: dict[str, Any]
    """The job configuration; a task of another one is not merged."""
    task: int
    train: TaskSplit
    val: TaskSplit
    corpus: dict[str, Any] = field(default_factory=dict)
    """``CorpusStats`` of the task's pieces."""
    pieces: int = 0
    """Pieces of the input the task read."""
    tokenizer: str = ""
    """URL of the sentencepiece model the task read (the merge copies it into the dataset)."""


@dataclass
class JobPlan:
    """What every task of a job is given: the configuration fingerprint and its pieces."""

    job: dict[str, Any]
    """Everything the output depends on (recorded in every task.json and the manifest)."""
    tasks: list[list[Piece]]
    """The pieces of each task, in reading order."""
    stats: CorpusStats
    """What planning met: the inputs' description, files skipped while listing them."""


def plan_job(cfg: ShardsConfig, tokenizer_sha256: str) -> JobPlan:
    """The job's pieces, shuffled with the seed and dealt to the tasks as contiguous runs of about equal bytes."""
    pieces, stats = plan_pieces(cfg.corpus, cfg.piece_bytes)
    if not pieces:
        raise DataPrepError(f"no input files ({stats.description}; skipped: {stats.skipped})")
    pieces = [pieces[i] for i in seeded_permutation(len(pieces), cfg.seed)]
    total = sum(max(p.size, 1) for p in pieces)
    tasks: list[list[Piece]] = [[] for _ in range(cfg.num_tasks)]
    done = 0
    for piece in pieces:  # a piece goes to the task whose share of the bytes holds its middle
        weight = max(piece.size, 1)
        tasks[min(cfg.num_tasks - 1, (2 * done + weight) * cfg.num_tasks // (2 * total))].append(piece)
        done += weight
    fingerprint = hashlib.sha256(json.dumps([to_dict(p) for p in pieces]).encode()).hexdigest()
    # round-tripped through JSON so that it compares equal to the copies the tasks recorded
    job = json.loads(json.dumps({
        "corpus": to_dict(cfg.corpus), "seed": cfg.seed, "val_fraction": cfg.val_fraction, "seq_len": cfg.seq_len,
        "windows_per_shard": cfg.windows_per_shard, "num_tasks": cfg.num_tasks, "shuffle_buffer": cfg.shuffle_buffer,
        "piece_bytes": cfg.piece_bytes, "tokenizer_sha256": tokenizer_sha256, "pieces_sha256": fingerprint,
    }))
    return JobPlan(job, tasks, stats)


def parse_task_range(text: str, num_tasks: int) -> range:
    """``A-B`` (inclusive) or ``A`` as the range of task indices it names, checked against ``num_tasks``."""
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ConfigError(f"tasks: {text!r} is not A-B or A (task indices)") from None
    if not 0 <= lo <= hi < num_tasks:
        raise ConfigError(f"tasks: {text!r} is not a range within the {num_tasks} tasks 0-{num_tasks - 1}")
    return range(lo, hi + 1)


def write_shards(cfg: ShardsConfig, tasks: range | None = None, progress: bool = True) -> dict:
    """Run the job: the tasks in ``tasks`` (default: all), then, when ``tasks`` is None, the merge.

    Returns a summary: per task whether it was kept or written; with the merge, per split
    documents / tokens / windows / shards / tail_tokens and the corpus stats; tokens encoded, seconds.
    """
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer)
    plan = plan_job(cfg, tokenizer.sha256)
    out = _Output(cfg.out)
    out.check_manifest(plan.job, cfg.overwrite)
    summary: dict[str, Any] = {"output": cfg.out, "tasks": {}, "tokens_encoded": 0}
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    with _encoder(tokenizer.data, dtype, cfg.workers) as encode:
        for t in tasks if tasks is not None else range(cfg.num_tasks):
            if out.finished_task(t, plan.job, cfg.overwrite) is not None:
                summary["tasks"][t] = "kept"
                continue
            record, encoded = _TaskWriter(out, cfg, plan, t, encode, dtype, progress).run()
            out.put(out.task_path(t, TASK_RECORD), (json.dumps(to_dict(record), indent=1) + "\n").encode())
            summary["tasks"][t] = "written"
            summary["tokens_encoded"] += encoded
    if tasks is None:
        summary.update(merge(cfg.out))
    summary["seconds"] = time.perf_counter() - start
    return summary


def merge(url: str) -> dict:
    """Merge the finished tasks at ``url`` into its manifest (see the module docstring).

    Returns the per-split totals and the corpus stats. A task that has not finished is a DataPrepError
    naming it.
    """
    out = _Output(url)
    records = out.task_records()
    if not records:
        raise DataPrepError(f"{url}: no finished task (no {TASKS_DIR}/*/{TASK_RECORD}): run `python -m data_prep "
                            f"shards` first")
    job = records[min(records)].job
    n = job["num_tasks"]
    missing = [t for t in range(n) if t not in records or records[t].job != job]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        raise DataPrepError(f"{url}: {len(missing)} of the {n} tasks have not finished (no {TASK_RECORD} of this "
                            f"job): task {shown}; run them (`python -m data_prep shards ... --num-tasks {n} "
                            f"--tasks A-B`), then merge again")
    tasks = [records[t] for t in range(n)]
    tokenizer_url = tasks[0].tokenizer
    tokenizer = load_tokenizer(tokenizer_url)
    if tokenizer.sha256 != job["tokenizer_sha256"]:
        raise DataPrepError(f"tokenizer {tokenizer_url} has changed since the tasks were encoded with it "
                            f"(sha256 {tokenizer.sha256[:12]}..., the tasks recorded {job['tokenizer_sha256'][:12]}...)")
    sp = tokenizer.processor
    stats = _sum_stats(tasks)
    entries = {}
    for name in SPLITS:
        parts = [getattr(r, name) for r in tasks]
        path, sha = out.concatenate([p.documents_path for p in parts], f"{name}/{DOCUMENTS_NAME}")
        entries[name] = SplitEntry(
            documents=sum(p.documents for p in parts), tokens=sum(p.tokens for p in parts),
            windows=sum(p.windows for p in parts), tail_tokens=sum(p.tail_tokens for p in parts),
            tail_documents=sum(p.tail_documents for p in parts),
            documents_path=path, documents_sha256=sha, shards=[s for p in parts for s in p.shards])
    read = {name: e.documents + e.tail_documents for name, e in entries.items()}
    if job["val_fraction"] > 0 and not read["val"]:
        raise DataPrepError(f"--val-fraction {job['val_fraction']} put none of the {sum(read.values())} documents in "
                            f"val: raise it, or pass 0 for no val split")
    for name in SPLITS:
        e = entries[name]
        if read[name] and not e.windows:
            hint = ", or a larger --val-fraction" if name == "val" else ""
            raise DataPrepError(f"the {name} split holds {e.tokens} tokens in {read[name]} documents, fewer than one "
                                f"window of seq_len + 1 = {job['seq_len'] + 1} tokens in any of the {n} tasks: use "
                                f"more input, a smaller --seq-len or fewer --num-tasks{hint}")
    if not read["train"]:
        raise DataPrepError(f"no training documents ({stats.description}; skipped: {stats.skipped})")
    out.put(TOKENIZER_NAME, tokenizer.data)
    dtype = dtype_for_vocab(sp.get_piece_size())
    manifest = Manifest(
        format=FORMAT, version=FORMAT_VERSION, seq_len=job["seq_len"], vocab_size=sp.get_piece_size(), dtype=dtype,
        bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id(),
        tokenizer=TokenizerEntry(path=TOKENIZER_NAME, sha256=job["tokenizer_sha256"],
                                 source=tokenizer_url),
        windows_per_shard=job["windows_per_shard"], sample_bytes=sample_bytes(job["seq_len"], dtype, crc=True),
        splits=Splits(**entries), corpus=to_dict(stats), job=job, tasks=n,
    )
    out.put(MANIFEST_NAME, manifest.to_json().encode())
    return {"output": url, "corpus": stats, "splits": {name: {
        "documents": e.documents, "tokens": e.tokens, "windows": e.windows, "shards": len(e.shards),
        "tail_tokens": e.tail_tokens, "tail_documents": e.tail_documents} for name, e in entries.items()}}


def _sum_stats(tasks: list[TaskRecord]) -> CorpusStats:
    stats = CorpusStats()
    skipped: dict[str, int] = {}
    for r in tasks:
        c = r.corpus
        stats.description = stats.description or c.get("description", "")
        stats.files += c.get("files", 0)
        stats.documents += c.get("documents", 0)
        stats.undecodable_documents += c.get("undecodable_documents", 0)
        stats.undecodable_sequences += c.get("undecodable_sequences", 0)
        for reason, k in c.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + k
    stats.skipped = dict(sorted(skipped.items()))
    return stats


class _Output:
    """The dataset directory at fsspec URL ``url``: its files, tasks and manifest."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, root = filesystem(url)
        self.root = root.rstrip("/")

    def put(self, rel: str, data: bytes) -> None:
        put_atomic(self.fs, f"{self.root}/{rel}", data)

    @staticmethod
    def task_path(task: int, rel: str = "") -> str:
        return f"{TASKS_DIR}/{task:05d}" + (f"/{rel}" if rel else "")

    def check_manifest(self, job: dict[str, Any], overwrite: bool) -> None:
        """Refuse a dataset of another configuration at the output (or remove it, with ``overwrite``)."""
        path = f"{self.root}/{MANIFEST_NAME}"
        if not self.fs.exists(path):
            return
        try:
            old = json.loads(self.fs.cat_file(path)).get("job", {})
        except (ValueError, AttributeError):
            old = {}
        if old == job:
            return
        if not overwrite:
            diff = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
            raise DataPrepError(f"{self.url}/{MANIFEST_NAME} was written by another configuration (differs in: "
                                f"{', '.join(diff)}); pass --overwrite to replace that dataset")
        for name in (MANIFEST_NAME, PROGRESS_NAME, TOKENIZER_NAME, TASKS_DIR, *SPLITS):
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.rm(f"{self.root}/{name}", recursive=True)

    def read_task(self, task: int) -> TaskRecord | None:
        path = f"{self.root}/{self.task_path(task, TASK_RECORD)}"
        try:
            return from_dict(TaskRecord, json.loads(self.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except (ValueError, ConfigError, TypeError) as exc:
            raise DataPrepError(f"{self.url}/{self.task_path(task, TASK_RECORD)}: unreadable ({exc}); remove "
                                f"that task's directory and run the task again") from None

    def task_records(self) -> dict[int, TaskRecord]:
        """The finished tasks at the output, by index."""
        records = {}
        if self.fs.exists(f"{self.root}/{TASKS_DIR}"):
            for path in self.fs.ls(f"{self.root}/{TASKS_DIR}", detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if name.isdigit() and (record := self.read_task(int(name))) is not None:
                    records[int(name)] = record
        return records

    def finished_task(self, task: int, job: dict[str, Any], overwrite: bool) -> TaskRecord | None:
        """Task ``task``'s record when it finished for ``job`` and its files match it; else None, its
        directory cleared for a new run (a task of another job is refused unless ``overwrite``)."""
        record = self.read_task(task)
        if record is not None and record.job != job and not overwrite:
            raise DataPrepError(f"{self.url}/{self.task_path(task)} was written by another configuration; pass "
                                f"--overwrite to replace it, or choose another --out")
        if record is not None and record.job == job:
            files = [(p.documents_path, p.documents_sha256) for p in (record.train, record.val)]
            files += [(s.path, s.sha256) for p in (record.train, record.val) for s in p.shards]
            if all(self._intact(rel, sha) for rel, sha in files):
                return record
            print(f"note: task {task} at {self.url} has damaged or missing files: writing it again")
        directory = f"{self.root}/{self.task_path(task)}"
        if self.fs.exists(directory):
            self.fs.rm(directory, recursive=True)
        return None

    def _intact(self, rel: str, sha256: str) -> bool:
        try:
            return hashlib.sha256(self.fs.cat_file(f"{self.root}/{rel}")).hexdigest() == sha256
        except FileNotFoundError:
            return False

    def concatenate(self, parts: list[str], rel: str) -> tuple[str, str]:
        """Write the files ``parts`` (paths relative to the output) one after the other to ``rel``,
        streaming; returns (rel, its sha256)."""
        h = hashlib.sha256()
        path = f"{self.root}/{rel}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path + ".tmp", "wb") as dst:
            for part in parts:
                with self.fs.open(f"{self.root}/{part}", "rb") as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        dst.write(block)
        self.fs.mv(path + ".tmp", path)
        return rel, h.hexdigest()


def shuffled(docs: Iterable[Document], size: int, seed: int) -> Iterator[Document]:
    """``docs`` through a shuffle buffer of ``size`` documents: once it is full, each arrival takes a slot
    drawn from the splitmix64 stream of ``seed`` and sends out the document that held it; at the end the
    rest leave in an order drawn the same way. Deterministic on every platform; memory is ``size``
    documents. The buffer mixes documents within a stretch of about ``size`` of the stream, not across the
    whole task (the pieces themselves are shuffled across tasks, see ``plan_job``)."""
    if size <= 1:
        yield from docs
        return
    buffer: list[Document] = []
    draws: list[int] = []
    drawn = 0
    for doc in docs:
        if len(buffer) < size:
            buffer.append(doc)
            continue
        if not draws:  # the stream, 4096 draws at a time
            draws = (splitmix64_outputs(seed, 4096, start=drawn) % np.uint64(size)).tolist()[::-1]
            drawn += 4096
        slot = draws.pop()
        yield buffer[slot]
        buffer[slot] = doc
    yield from (buffer[i] for i in np.argsort(splitmix64_outputs(seed, len(buffer), start=drawn), kind="stable"))


class _SplitWriter:
    """One task's stream of one split: documents list, windows, shards.

    The documents list holds the documents whose BOS is written (in a window, the last window's final
    token included); one that starts in the tail is counted in ``tail_documents`` instead, so the list
    is exactly the documents a reader of the windows meets, in order (the retrieval jobs rely on it).
    """

    def __init__(self, out: _Output, task: int, name: str, seq_len: int, windows_per_shard: int, dtype: str) -> None:
        self.out, self.task, self.name = out, task, name
        self.seq_len, self.windows_per_shard, self.dtype = seq_len, windows_per_shard, dtype
        self.shards: list[ShardEntry] = []
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = 0
        self.documents = 0
        self.lines: deque[bytes] = deque()  # documents routed here whose tokens have not come back yet
        self.placed: deque[tuple[int, bytes]] = deque()  # (stream position of the BOS, line), not yet listed
        self.docs_rel = out.task_path(task, f"{name}/{DOCUMENTS_NAME}")
        self.docs_path = f"{out.root}/{self.docs_rel}"
        out.fs.makedirs(self.docs_path.rsplit("/", 1)[0], exist_ok=True)
        self.docs_file = out.fs.open(self.docs_path + ".tmp", "wb")
        self.docs_sha = hashlib.sha256()

    def add_document(self, doc: Document) -> None:
        self.lines.append((json.dumps({"source": doc.source, "offset": doc.offset, "sha256": doc.sha256.hex()})
                           + "\n").encode())

    def add_tokens(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """The tokens of the next ``len(lengths)`` documents routed here (each led by BOS)."""
        starts = self.tokens + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        self.placed.extend((int(start), self.lines.popleft()) for start in starts)
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.tokens += len(tokens)
        span = self.windows_per_shard * self.seq_len
        if self.buffered < span + 1:
            return
        buf = np.concatenate(self.buffer)
        self.buffer = []  # the pieces go before the shards are written: one copy of the tokens at a time
        while len(buf) >= span + 1:
            self._put_shard(buf[:span + 1], self.windows_per_shard)
            buf = buf[span:]
        self.buffer, self.buffered = [buf.copy()], len(buf)

    def _list_documents(self, written: int) -> None:
        """List the documents whose BOS lies in the first ``written`` tokens of the stream."""
        while self.placed and self.placed[0][0] < written:
            line = self.placed.popleft()[1]
            self.docs_file.write(line)
            self.docs_sha.update(line)
            self.documents += 1

    def finish(self) -> TaskSplit:
        L = self.seq_len
        buf = np.concatenate(self.buffer) if self.buffer else np.zeros(0, self.dtype)
        n = (len(buf) - 1) // L if len(buf) > L else 0
        if n:
            self._put_shard(buf[:n * L + 1], n)
        windows = sum(s.windows for s in self.shards)
        self._list_documents(windows * L + 1 if windows else 0)
        tail = self.tokens - (windows * L + 1) if windows else self.tokens
        self.docs_file.close()
        self.out.fs.mv(self.docs_path + ".tmp", self.docs_path)
        return TaskSplit(documents=self.documents, tokens=self.tokens, windows=windows, tail_tokens=tail,
                         tail_documents=len(self.placed), documents_path=self.docs_rel,
                         documents_sha256=self.docs_sha.hexdigest(), shards=self.shards)

    def _put_shard(self, stream: np.ndarray, n: int) -> None:
        """Write the next shard: the n windows of ``stream`` (n * seq_len + 1 tokens)."""
        L, k = self.seq_len, len(self.shards)
        windows = np.lib.stride_tricks.sliding_window_view(stream, L + 1)[::L]
        first = k * self.windows_per_shard
        rel = self.out.task_path(self.task, f"{self.name}/shard-{k:06d}.tar")
        size, sha256 = put_stream_atomic(self.out.fs, f"{self.out.root}/{rel}", shard_blocks(windows, first, self.task))
        self.shards.append(ShardEntry(path=rel, windows=n, tokens=n * (L + 1), bytes=size, sha256=sha256,
                                      task=self.task, first_key=first))
        self._list_documents((first + n) * L + 1)


class _TaskWriter:
    """Runs task ``task`` of a job from its start (see the module docstring)."""

    def __init__(self, out: _Output, cfg: ShardsConfig, plan: JobPlan, task: int, encode: Callable, dtype: str,
                 progress: bool) -> None:
        self.out, self.cfg, self.plan, self.task, self.encode = out, cfg, plan, task, encode
        self.dtype, self.progress = dtype, progress

    def run(self) -> tuple[TaskRecord, int]:
        cfg, t = self.cfg, self.task
        pieces = self.plan.tasks[t]
        writers = {name: _SplitWriter(self.out, t, name, cfg.seq_len, cfg.windows_per_shard, self.dtype)
                   for name in SPLITS}
        stats = CorpusStats(description=self.plan.stats.description)
        threshold = cfg.val_fraction * 2.0**64
        seed = int(splitmix64_outputs(cfg.seed, t + 1)[t])  # task t's own stream of draws
        docs = shuffled(iter_documents(pieces, cfg.corpus, stats), cfg.shuffle_buffer, seed)
        bar = tqdm(unit="doc", desc=f"task {t}", disable=not self.progress)
        encoded, clock = 0, time.perf_counter()

        def routed() -> Iterator[tuple[str, Document]]:
            for doc in docs:
                name = "val" if int.from_bytes(doc.sha256[:8], "big") < threshold else "train"
                writers[name].add_document(doc)
                bar.update(1)
                yield name, doc

        for name, (tokens, lengths) in self.encode(routed()):
            writers[name].add_tokens(tokens, lengths)
            encoded += len(tokens)
            bar.set_postfix(tokens=encoded, tok_s=f"{encoded / (time.perf_counter() - clock):,.0f}")
        bar.close()
        splits = {name: w.finish() for name, w in writers.items()}
        if t == 0:  # the listing's skips are counted once, with the first task
            for reason, k in self.plan.stats.skipped.items():
                stats.skipped[reason] = stats.skipped.get(reason, 0) + k
        stats.skipped = dict(sorted(stats.skipped.items()))
        return TaskRecord(job=self.plan.job, task=t, corpus=to_dict(stats), pieces=len(pieces),
                          tokenizer=self.cfg.tokenizer, **splits), encoded


# Worker-process state: the tokenizer is loaded once per process by the pool initializer.
_worker: tuple[spm.SentencePieceProcessor, str] | None = None


def _init_worker(model: bytes, dtype: str, parent: int | None = None) -> None:
    global _worker
    if parent is not None:
        die_with_parent(parent)
    _worker = (spm.SentencePieceProcessor(model_proto=model), dtype)


def die_with_parent(parent: int) -> None:
    """Make this worker process end when process ``parent`` (the job) dies, however it dies (Linux:
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere the pool's own shutdown is all there is)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the job died before the call
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    sp, dtype = _worker
    return encode_documents(sp, texts, dtype)


@contextlib.contextmanager
def _encoder(model: bytes, dtype: str, workers: int) -> Iterator[Callable]:
    """A function mapping a stream of (split, document) to (split, (tokens, lengths) of a batch of that
    split's documents), in order.

    Batches of each split are cut from its documents in stream order, and results are taken in
    submission order, so the output does not depend on which worker finishes first; at most two
    batches per worker are in flight, which bounds memory.
    """
    if workers == 1:
        _init_worker(model, dtype)

        def inline(stream: Iterable[tuple[str, Document]]) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray]]]:
            for name, texts in document_batches(stream):
                yield name, _encode_batch(texts)

        yield inline
        return
    # concurrent.futures, not multiprocessing.Pool: when a worker dies (the OOM killer, a
    # signal) the pending results raise BrokenProcessPool instead of waiting forever
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(model, dtype, os.getpid())) as pool:
        def ordered(stream: Iterable[tuple[str, Document]]) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray]]]:
            pending: deque = deque()
            try:
                for name, texts in document_batches(stream):
                    pending.append((name, pool.submit(_encode_batch, texts)))
                    if len(pending) >= 2 * workers:
                        name, future = pending.popleft()
                        yield name, future.result()
                while pending:
                    name, future = pending.popleft()
                    yield name, future.result()
            except BrokenProcessPool:
                raise DataPrepError(
                    "a tokenizer worker process died (killed by the system, e.g. out of memory?); "
                    "re-run the same command: finished tasks are kept"
                ) from None

        yield ordered


def document_batches(stream: Iterable[tuple[str, Document]]) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) batches of up to about 1M characters or 4096 documents, each of one split, the
    documents of a split in stream order."""
    batches: dict[str, tuple[list[str], list[int]]] = {}
    for name, doc in stream:
        texts, chars = batches.setdefault(name, ([], [0]))
        texts.append(doc.text)
        chars[0] += len(doc.text)
        if chars[0] >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
            yield name, texts
            del batches[name]
    for name, (texts, _) in batches.items():
        yield name, texts
