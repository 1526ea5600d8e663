"""A raw corpus as documents: fsspec inputs, plain text and JSON lines, and the default corpus.

Inputs are fsspec URLs (``/data``, ``file:///data``, ``memory://c``, ``s3://bucket/p``), globs of
them, or directories. A JSON-lines file (``.jsonl``, ``.jsonl.gz``) holds one document per line in
a text field; any other file is one plain-text document. Documents come out in a fixed order:
inputs as given, each glob or directory sorted, lines in file order. An existing path is taken
literally; one that does not exist and holds ``*``, ``?`` or ``[`` is a glob. The whole corpus is
held in memory as Python strings (1 to 4 bytes per character: one character beyond Latin-1 makes
a whole document 4 bytes per character), so plan RAM of 1x (ASCII) to 4-6x (other text) the
corpus size.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import sysconfig
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.storage import filesystem
from zarvan_dist.config import ConfigError
from zarvan_dist.data.hashing import splitmix64_outputs

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
DEFAULT_EXTENSIONS = [
    ".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js",
    ".ts", ".go", ".rs", ".sh", ".html", ".css", ".yaml", ".yml", ".toml", *JSONL_SUFFIXES,
]
# Remote files are fetched this many at a time by this many threads.
_READ_THREADS = 16
_READ_BATCH = 256


@dataclass
class CorpusConfig:
    """Where the documents come from and how files become documents."""

    inputs: list[str] = field(default_factory=list)
    """fsspec URLs, globs or directories; empty means the default corpus (this Python's stdlib)."""
    text_field: str = "text"
    """Field of each JSON line that holds the document text."""
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    """File suffixes taken from directories (explicit files and glob matches are always taken)."""
    max_docs: int | None = None
    """Stop after this many documents (in input order, before shuffling); None reads all."""
    skip_bad_json: bool = False
    """Skip and count malformed JSON lines instead of stopping at the first."""

    def __post_init__(self) -> None:
        if self.max_docs is not None and self.max_docs < 1:
            raise ConfigError(f"max_docs: expected a positive integer or None, got {self.max_docs}")


@dataclass(slots=True)
class Document:
    """One document of the corpus."""

    source: str
    """URL of the file it came from."""
    line: int | None
    """1-based line in a JSON-lines file; None when the document is the whole file."""
    text: str
    """The text, undecodable bytes replaced by U+FFFD."""
    sha256: bytes
    """sha256 of the text's UTF-8 bytes (32 bytes)."""


@dataclass
class CorpusStats:
    """What reading the corpus met; part of the manifest and the job summary."""

    description: str = ""
    """The inputs, or which default corpus was used."""
    files: int = 0
    """Files read."""
    documents: int = 0
    """Documents kept."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Files or lines skipped, by reason: empty, binary, extension, duplicate, bad_json."""
    undecodable_documents: int = 0
    """Documents in which invalid UTF-8 was replaced."""
    undecodable_sequences: int = 0
    """Invalid UTF-8 byte sequences (or lone surrogates in JSON) replaced with U+FFFD."""


def default_corpus_files() -> tuple[Path, list[str]]:
    """The Python standard library's ``*.py`` files of this interpreter, sorted.

    Installed packages (site-packages, dist-packages) are left out so that every machine with the
    same Python version yields the same corpus. Returns (stdlib root, file paths).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` fixed by ``seed``, identical on every platform and version.

    Index i is keyed by output i + 1 of the splitmix64 generator seeded with ``seed`` and the
    indices sorted by key: plain integer arithmetic, so the order does not depend on a library's
    random-number streams. Returns an (n,) int64 array.
    """
    return np.argsort(splitmix64_outputs(seed, n), kind="stable")


def read_corpus(cfg: CorpusConfig, progress: bool = True) -> tuple[list[Document], CorpusStats]:
    """All documents of the corpus in input order, and what was skipped or replaced on the way."""
    stats = CorpusStats()
    skipped: Counter[str] = Counter()
    if cfg.inputs:
        files = _resolve_inputs(cfg, skipped)
        stats.description = "inputs: " + " ".join(cfg.inputs)
    else:
        root, paths = default_corpus_files()
        fs = fsspec.filesystem("file")
        files = [(fs, p) for p in paths]
        stats.description = f"default corpus: Python {platform.python_version()} stdlib *.py under {root}"
    docs: list[Document] = []
    bar = tqdm(total=len(files), unit="file", desc="read", disable=not progress)
    for fs, path, data in _fetch(files):
        url = fs.unstrip_protocol(path)
        stats.files += 1
        bar.update(1)
        if path.endswith(JSONL_SUFFIXES):
            new = _jsonl_documents(path, url, data, cfg, stats, skipped)
        elif b"\0" in data:
            skipped["binary"] += 1
            continue
        else:
            text, utf8 = _decode(data, stats)
            new = [Document(url, None, text, hashlib.sha256(utf8).digest())]
        for doc in new:
            if not doc.text:
                skipped["empty"] += 1
                continue
            docs.append(doc)
            if len(docs) == cfg.max_docs:
                break
        if len(docs) == cfg.max_docs:
            break
    bar.close()
    stats.documents = len(docs)
    stats.skipped = dict(sorted(skipped.items()))
    return docs, stats


def _resolve_inputs(cfg: CorpusConfig, skipped: Counter[str]) -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """(filesystem, path) of every input file, in order, each file once."""
    out, seen = [], set()
    for url in cfg.inputs:
        fs, path = filesystem(url)
        # a path that exists is taken literally, even with glob characters in its name
        if any(c in path for c in "*?[") and not fs.exists(path):
            matches = sorted(fs.glob(path))
            if not matches:
                raise DataPrepError(f"input {url}: no file matches this pattern")
            candidates = []
            for match in matches:
                candidates += _walk(fs, match, cfg, skipped) if fs.isdir(match) else [match]
        elif fs.isdir(path):
            candidates = _walk(fs, path, cfg, skipped)
        elif fs.isfile(path):
            candidates = [path]
        else:
            raise DataPrepError(f"input {url}: no such file or directory")
        for p in candidates:
            key = fs.unstrip_protocol(p)
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            out.append((fs, p))
    return out


def _walk(fs: fsspec.AbstractFileSystem, path: str, cfg: CorpusConfig, skipped: Counter[str]) -> list[str]:
    files = []
    for p in sorted(fs.find(path)):
        if p.endswith(tuple(cfg.extensions)):
            files.append(p)
        else:
            skipped["extension"] += 1
    return files


def _fetch(files: list[tuple[fsspec.AbstractFileSystem, str]]) -> Iterator[tuple[fsspec.AbstractFileSystem, str, bytes]]:
    """(fs, path, bytes) of each file in order.

    Object stores answer each GET after tens of milliseconds, so their files are fetched
    concurrently, a batch at a time; local files are read in turn, where threads only add overhead.
    """
    def read(item: tuple[fsspec.AbstractFileSystem, str]) -> bytes:
        fs, path = item
        try:
            return fs.cat_file(path)
        except (OSError, ValueError) as exc:
            raise DataPrepError(f"cannot read input {fs.unstrip_protocol(path)}: {exc}") from None

    with ThreadPoolExecutor(_READ_THREADS) as pool:
        for i in range(0, len(files), _READ_BATCH):
            batch = files[i:i + _READ_BATCH]
            local = all(isinstance(fs, LocalFileSystem) for fs, _ in batch)
            for (fs, path), data in zip(batch, map(read, batch) if local else pool.map(read, batch)):
                yield fs, path, data


def _decode(data: bytes, stats: CorpusStats) -> tuple[str, bytes]:
    """The text of UTF-8 ``data`` and the text's own UTF-8 bytes.

    Invalid sequences become U+FFFD and are counted; then the bytes differ from ``data``.
    """
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        stats.undecodable_documents += 1
        stats.undecodable_sequences += text.count("\ufffd") - data.count("\ufffd".encode())
        return text, text.encode("utf-8")


def _json_document(source: str, line: int, text: str, stats: CorpusStats) -> Document:
    """The Document of a JSON string, whose lone surrogates (``\\ud800`` escapes) are replaced."""
    try:
        utf8 = text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        stats.undecodable_documents += 1
        stats.undecodable_sequences += fixed.count("\ufffd") - text.count("\ufffd")
        text, utf8 = fixed, fixed.encode("utf-8")
    return Document(source, line, text, hashlib.sha256(utf8).digest())


def _jsonl_documents(
    path: str, url: str, data: bytes, cfg: CorpusConfig, stats: CorpusStats, skipped: Counter[str],
) -> list[Document]:
    """The documents of one JSON-lines file (``data`` is its raw, maybe gzipped, content)."""
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataPrepError(f"cannot read input {url}: not a valid gzip file: {exc}") from None
    docs = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        problem = None
        try:
            record = json.loads(_decode(raw, stats)[0])
        except json.JSONDecodeError as exc:
            problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
        else:
            if not isinstance(record, dict) or not isinstance(record.get(cfg.text_field), str):
                problem = f"no string field {cfg.text_field!r}"
        if problem:
            if not cfg.skip_bad_json:
                raise DataPrepError(f"{url} line {lineno}: {problem} (pass --skip-bad-json to skip such lines)")
            skipped["bad_json"] += 1
            continue
        docs.append(_json_document(url, lineno, record[cfg.text_field], stats))
    return docs

