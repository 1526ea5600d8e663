"""Synthetic corpora for the data-prep scale benchmark: JSON lines or parquet files of a given size.

A document (2-20 KB of text, sizes log-uniform) is, with equal odds, a run of whole lines of this
Python's standard library ``*.py`` files (the files concatenated, a random start moved to the next
line) or a run of prose paragraphs: sentences of words drawn from the words of those same files,
with their frequencies. Each document starts with a title line holding its index, so no two are alike. The
corpus is fixed by the seed, this Python's stdlib and numpy's generator; text is repeated from
pools of about 30 MB (code) and 16 MB (prose) at random offsets, so compressors see little repetition
within a block but sentencepiece sees realistic text.

On disk: ``ROOT/{jsonl,parquet}-{size}-seed{seed}/part-NNNNN.{jsonl,parquet}``, files of about
``file_bytes`` bytes of text. JSON lines hold ``{"text", "id", "kind"}``; parquet holds columns
``text`` (string), ``id`` (int64) and ``kind`` (string) in row groups of about an eighth of a file
each. ``corpus.json``, written last, records the spec and the counts: a corpus with it and the same
spec is reused, any other one at that path (an older spec, an interrupted write) is written again.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.corpus import default_corpus_files

GENERATOR_VERSION = 1
"""Bumped when the documents change, so that corpora of an older generator are written again."""
FORMATS = ("jsonl", "parquet")
_DOC_BYTES = (2_000, 20_000)
_PROSE_CHARS = 16_000_000
_WORDS = 30_000
_BATCH_DOCS = 2048
RECORD_NAME = "corpus.json"


@dataclass(frozen=True)
class CorpusSpec:
    """What a synthetic corpus is: its format, size and seed."""

    fmt: str
    """``jsonl`` or ``parquet``."""
    text_bytes: int
    """UTF-8 bytes of document text (the files are somewhat larger for JSON lines, smaller for parquet)."""
    file_bytes: int
    """Bytes of text per file; the last file holds the rest."""
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.fmt}-{self.text_bytes / 1e9:g}GB-{self.file_bytes / 1e6:g}MBfiles-seed{self.seed}"


@dataclass
class Corpus:
    """A corpus on disk and what it holds."""

    path: Path
    spec: CorpusSpec
    documents: int
    text_bytes: int
    files: int
    disk_bytes: int
    seconds: float
    """Seconds it took to write (when it was written)."""
    reused: bool = False


def ensure_corpus(root: Path, spec: CorpusSpec) -> Corpus:
    """The corpus of ``spec`` under ``root``: the one already there when its record matches, else written."""
    if spec.fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {spec.fmt!r}")
    path = root / spec.name
    record = _read_record(path)
    if record is not None and record["spec"] == asdict(spec) and record["generator"] == _generator_id():
        return Corpus(path, spec, record["documents"], record["text_bytes"], record["files"],
                      record["disk_bytes"], record["seconds"], reused=True)
    if path.exists():
        shutil.rmtree(path)
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    write = _write_jsonl if spec.fmt == "jsonl" else _write_parquet
    documents, text_bytes, files = write(partial, spec)
    disk = sum(p.stat().st_size for p in partial.iterdir())
    seconds = time.perf_counter() - start
    (partial / RECORD_NAME).write_text(json.dumps({
        "spec": asdict(spec), "generator": _generator_id(), "documents": documents, "text_bytes": text_bytes,
        "files": files, "disk_bytes": disk, "seconds": seconds}, indent=1) + "\n")
    partial.rename(path)
    return Corpus(path, spec, documents, text_bytes, files, disk, seconds)


def data_files(corpus: Corpus) -> list[str]:
    """The corpus's data files (not its record), sorted: the inputs to give the jobs."""
    return sorted(str(p) for p in corpus.path.glob(f"part-*.{corpus.spec.fmt}"))


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads((path / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def _generator_id() -> dict:
    return {"version": GENERATOR_VERSION, "python": platform.python_version(), "numpy": np.__version__}


def _documents(seed: int) -> Iterator[tuple[list[str], list[str]]]:
    """Endless batches of (texts, kinds), deterministic for the seed."""
    rng = np.random.default_rng(seed)
    code = _code_pool()
    prose = _prose_pool(code, rng)
    pools = {"code": code, "prose": prose}
    lo, hi = np.log(_DOC_BYTES[0]), np.log(_DOC_BYTES[1])
    index = 0
    while True:
        sizes = np.exp(rng.uniform(lo, hi, _BATCH_DOCS)).astype(np.int64)
        is_code = rng.random(_BATCH_DOCS) < 0.5
        offsets = rng.random(_BATCH_DOCS)
        texts, kinds = [], []
        for size, c, u in zip(sizes.tolist(), is_code.tolist(), offsets.tolist()):
            kind = "code" if c else "prose"
            pool, sep = pools[kind], "\n" if c else "\n\n"  # code: a line; prose: a paragraph
            start = pool.find(sep, int(u * (len(pool) - _DOC_BYTES[1] - 1))) + len(sep)
            title = f"# document {index}\n" if c else f"Document {index}\n\n"
            texts.append(title + pool[start:start + size])
            kinds.append(kind)
            index += 1
        yield texts, kinds


def _code_pool() -> str:
    _, paths = default_corpus_files()
    parts = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "".join(parts)


def _prose_pool(code: str, rng: np.random.Generator) -> str:
    """About ``_PROSE_CHARS`` of sentences (4-24 words) in paragraphs (2-7 sentences), words drawn by frequency."""
    counts = Counter(w.lower() for w in re.findall(r"[A-Za-z]{2,14}", code))
    common = counts.most_common(_WORDS)
    words = np.array([w for w, _ in common], dtype=object)
    p = np.array([n for _, n in common], dtype=np.float64)
    drawn = words[rng.choice(len(words), size=_PROSE_CHARS // 6, p=p / p.sum())].tolist()
    lengths = rng.integers(4, 25, size=len(drawn) // 4).tolist()
    breaks = rng.integers(2, 8, size=len(lengths)).tolist()
    out, at, until_break = [], 0, breaks[0]
    for k, n in enumerate(lengths):
        sentence = drawn[at:at + n]
        if len(sentence) < n:
            break
        at += n
        out.append(" ".join(sentence).capitalize() + ("." if k % 7 else "?"))
        until_break -= 1
        if until_break == 0:
            out.append("\n\n")
            until_break = breaks[k]
        else:
            out.append(" ")
    return "".join(out)


def _write_jsonl(directory: Path, spec: CorpusSpec) -> tuple[int, int, int]:
    documents = total = file_bytes = files = 0
    f = None
    try:
        for texts, kinds in _documents(spec.seed):
            for text, kind in zip(texts, kinds):
                if f is None or file_bytes >= spec.file_bytes:
                    if f is not None:
                        f.close()
                    f = open(directory / f"part-{files:05d}.jsonl", "wb")
                    files, file_bytes = files + 1, 0
                n = len(text.encode("utf-8"))
                f.write((json.dumps({"text": text, "id": documents, "kind": kind}, ensure_ascii=False) + "\n")
                        .encode("utf-8"))
                documents, total, file_bytes = documents + 1, total + n, file_bytes + n
                if total >= spec.text_bytes:
                    return documents, total, files
    finally:
        if f is not None:
            f.close()
    raise AssertionError("unreachable: the document stream is endless")


def _write_parquet(directory: Path, spec: CorpusSpec) -> tuple[int, int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    group_bytes = min(max(spec.file_bytes // 8, 1_000_000), 64_000_000)
    schema = pa.schema([("text", pa.string()), ("id", pa.int64()), ("kind", pa.string())])
    documents = total = file_bytes = files = 0
    writer = None
    group: tuple[list[str], list[int], list[str]] = ([], [], [])
    group_size = 0

    def flush() -> None:
        nonlocal group, group_size
        if group[0]:
            table = pa.table({"text": group[0], "id": group[1], "kind": group[2]}, schema=schema)
            writer.write_table(table, row_group_size=len(group[0]))
        group, group_size = ([], [], []), 0

    try:
        for texts, kinds in _documents(spec.seed):
            for text, kind in zip(texts, kinds):
                if writer is None or file_bytes >= spec.file_bytes:
                    if writer is not None:
                        flush()
                        writer.close()
                    writer = pq.ParquetWriter(directory / f"part-{files:05d}.parquet", schema)
                    files, file_bytes = files + 1, 0
                n = len(text.encode("utf-8"))
                group[0].append(text)
                group[1].append(documents)
                group[2].append(kind)
                documents, total, file_bytes, group_size = documents + 1, total + n, file_bytes + n, group_size + n
                if group_size >= group_bytes:
                    flush()
                if total >= spec.text_bytes:
                    flush()
                    return documents, total, files
    finally:
        if writer is not None:
            writer.close()
    raise AssertionError("unreachable: the document stream is endless")
