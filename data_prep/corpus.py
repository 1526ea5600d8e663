"""A raw corpus as a stream of documents: fsspec inputs, text, JSON lines and parquet, the default corpus.

Inputs are fsspec URLs (``/data``, ``file:///data``, ``memory://c``, ``s3://bucket/p``), globs of
them, or directories. An existing path is taken literally; one that does not exist and holds
``*``, ``?`` or ``[`` is a glob. The format of a file follows its suffix:

- JSON lines (``.jsonl``, ``.json``, and compressed ``.jsonl.gz``, ``.json.gz``, ``.jsonl.zst``,
  ``.json.zst``): one document per line, in the string field ``text_field``; blank lines are
  skipped; a malformed line is an error naming the file and the line (or skipped and counted).
- Apache Parquet (``.parquet``): one document per row, in the string column ``text_field``; only
  that column is read; a null is skipped and counted.
- Any other file: one plain-text document, the whole file (a file with a NUL byte is skipped as
  binary). Invalid UTF-8 becomes U+FFFD and is counted.

Reading has two steps. ``plan_pieces`` resolves the inputs and cuts each file into pieces: a large
uncompressed JSON-lines file into byte ranges (a range holds the lines whose first byte lies in
it), a large parquet file into ranges of row groups, anything else one piece per file. Pieces are
the unit a job spreads over tasks; the same inputs and piece size give the same pieces.
``iter_documents`` streams the documents of pieces. Documents come out in a fixed order: inputs
as given, each glob or directory sorted, pieces in file order, lines or rows in file order.

Memory is bounded whatever the corpus size: a read block (about 1 MiB of decompressed JSON lines;
a few hundred rows of a parquet column, from 1 MiB buffers) plus the document being read, which
for a plain-text file is the whole file; a few MiB in all. ``read_corpus`` collects all documents in a list (small
corpora only); ``sample_documents`` keeps a seeded sample of about a given size.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import os
import platform
import sysconfig
import zlib
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.storage import filesystem
from zarvan_dist.config import ConfigError
from zarvan_dist.data.hashing import splitmix64_mix, splitmix64_outputs

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
"""Suffixes of JSON-lines files."""
_COMPRESSED_SUFFIXES = (".gz", ".zst")
"""Compressed JSON lines: read as one stream, in one piece."""
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_EXTENSIONS = [
    ".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js",
    ".ts", ".go", ".rs", ".sh", ".html", ".css", ".yaml", ".yml", ".toml",
    # a bare .json in a directory is more often a JSON document than JSON lines: taken only when named
    *(s for s in JSONL_SUFFIXES if s != ".json"), *PARQUET_SUFFIXES,
]
PIECE_BYTES = 256 << 20
"""Default size of a piece: large uncompressed JSON-lines and parquet files are cut into pieces of about this."""
_READ_BLOCK = 1 << 20
"""Bytes of (decompressed) JSON lines read at a time."""
_ZSTD_INPUT_BLOCKS = (1 << 10, 4 << 10, 4 << 20)
"""Least, first and most compressed bytes fed to the zstd decompressor at a time."""
_PARQUET_ROWS = 256
"""Rows of a parquet text column decoded at a time."""
_PARQUET_BUFFER = 1 << 20
"""Bytes pyarrow buffers per column chunk, so that a row group is never read whole."""
# Object stores answer each GET after tens of milliseconds, so small whole files on them are fetched
# by threads ahead of the reader: at most _PREFETCH_AHEAD pieces of at most _PREFETCH_FILE_BYTES each.
_READ_THREADS = 16
_PREFETCH_AHEAD = 64
_PREFETCH_FILE_BYTES = 256 << 10
_EXTRAS = "pip install 'zarvan-dist[corpus]'"


@dataclass
class CorpusConfig:
    """Where the documents come from and how files become documents."""

    inputs: list[str] = field(default_factory=list)
    """fsspec URLs, globs or directories; empty means the default corpus (this Python's stdlib)."""
    text_field: str = "text"
    """Field of each JSON line, or column of a parquet file, that holds the document text."""
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    """File suffixes taken from directories (explicit files and glob matches are always taken)."""
    max_docs: int | None = None
    """Stop after this many documents, in the order they are read (the shards job reads its pieces after
    shuffling them, and takes it with one task only); None reads all."""
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
    offset: int | None
    """Where in the file: byte offset of its line in a JSON-lines file (of the decompressed text where
    compressed), row index in a parquet file, None when the document is the whole file."""
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
    """Files, lines or rows skipped, by reason: empty, binary, extension, duplicate, bad_json, null_text."""
    undecodable_documents: int = 0
    """Documents in which invalid UTF-8 was replaced."""
    undecodable_sequences: int = 0
    """Invalid UTF-8 byte sequences (or lone surrogates in JSON) replaced with U+FFFD."""


@dataclass(frozen=True)
class Piece:
    """A unit of reading: a whole file, a byte range of an uncompressed JSON-lines file, or a range of
    row groups of a parquet file."""

    url: str
    """The file's fsspec URL (``fs.unstrip_protocol(path)``)."""
    kind: str
    """``"text"`` (the whole file is one document), ``"jsonl"`` or ``"parquet"``."""
    size: int
    """Bytes of the file this piece covers, as stored (compressed where compressed): the file's size for
    a whole file, the range's length for a byte range, the row groups' compressed size for row groups.
    Used to weigh pieces."""
    start: int = 0
    """jsonl: first byte of the range; parquet: first row group."""
    stop: int | None = None
    """jsonl: end byte of the range (exclusive); parquet: end row group (exclusive); None: to the end."""


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


def plan_pieces(cfg: CorpusConfig, piece_bytes: int = PIECE_BYTES) -> tuple[list[Piece], CorpusStats]:
    """Every input file resolved and cut into pieces of about ``piece_bytes``, in input order.

    Globs and directories (files with ``cfg.extensions``) are expanded and sorted; a file met twice
    is read once and counted as skipped "duplicate"; a missing input is an error naming it. An
    uncompressed JSON-lines file larger than ``piece_bytes`` becomes byte ranges of about that size;
    a parquet file larger than it, ranges of whole row groups of about that compressed size (its
    footer is read to find them; one row group at least per piece). Compressed JSON lines and plain
    text are one piece per file. Returns the pieces and stats with ``description`` and ``skipped``
    filled (files and documents are counted by ``iter_documents``). The same inputs and
    ``piece_bytes`` give the same pieces.
    """
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes: expected a positive integer, got {piece_bytes}")
    stats = CorpusStats()
    skipped: Counter[str] = Counter()
    if cfg.inputs:
        files = _resolve_inputs(cfg, skipped)
        stats.description = "inputs: " + " ".join(cfg.inputs)
    else:
        root, paths = default_corpus_files()
        fs = fsspec.filesystem("file")
        files = [(fs, p, os.path.getsize(p)) for p in paths]
        stats.description = f"default corpus: Python {platform.python_version()} stdlib *.py under {root}"
    pieces: list[Piece] = []
    for fs, path, size in files:
        url = fs.unstrip_protocol(path)
        if path.endswith(PARQUET_SUFFIXES):
            pieces += _parquet_pieces(fs, path, url, size, piece_bytes)
        elif path.endswith(JSONL_SUFFIXES):
            pieces += _jsonl_pieces(path, url, size, piece_bytes)
        else:
            pieces.append(Piece(url, "text", size))
    stats.skipped = dict(sorted(skipped.items()))
    return pieces, stats


def iter_documents(pieces: Iterable[Piece], cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Document]:
    """The documents of ``pieces``, in order, streamed in bounded memory (see the module docstring).

    Adds to ``stats`` what it meets: a file when its first piece is read (``start == 0``), each
    document yielded, lines and files skipped by reason (empty, binary, bad_json, null_text) and
    undecodable text. Stops after ``cfg.max_docs`` documents. Unreadable, corrupt or truncated files,
    a malformed JSON line (unless ``cfg.skip_bad_json``) and a missing parquet column are a
    ``DataPrepError`` naming the file.
    """
    yielded = 0
    for piece, fs, path, fetched in _read_ahead(pieces):
        if piece.start == 0:
            stats.files += 1
        if piece.kind == "text":
            data = fetched.result() if fetched is not None else _read_whole(fs, path, piece.url)
            docs = _text_documents(piece.url, data, stats)
        elif piece.kind == "jsonl":
            docs = _jsonl_documents(fs, path, piece, cfg, stats)
        elif piece.kind == "parquet":
            docs = _parquet_documents(fs, path, piece, cfg.text_field, stats)
        else:
            raise ValueError(f"{piece.url}: unknown piece kind {piece.kind!r}")
        with closing(docs):
            for doc in docs:
                if not doc.text:
                    _skip(stats, "empty")
                    continue
                stats.documents += 1
                yielded += 1
                yield doc
                if yielded == cfg.max_docs:
                    return


def read_corpus(cfg: CorpusConfig, progress: bool = True) -> tuple[list[Document], CorpusStats]:
    """All documents of the corpus in input order, and what was skipped or replaced on the way.

    Holds every document in memory: for small corpora (an evaluation text, tests); jobs over a
    whole corpus stream with ``plan_pieces`` and ``iter_documents``.
    """
    pieces, stats = plan_pieces(cfg)
    docs = list(iter_documents(_progress(pieces, "read", progress), cfg, stats))
    return docs, stats


def sample_documents(cfg: CorpusConfig, sample_bytes: int, seed: int,
                     progress: bool = True) -> tuple[list[str], CorpusStats]:
    """A seeded sample of the document texts of the whole corpus, about ``sample_bytes`` UTF-8 bytes.

    Each document is keyed by splitmix64 of its sha256 prefix and the seed; the sample is the
    documents of smallest key whose bytes first reach ``sample_bytes`` (all documents where the
    corpus is smaller), returned in key order. One streaming pass keeps the candidates in a heap
    that evicts the largest key, so memory is about ``sample_bytes`` plus a read block, and the
    sample depends on the documents and the seed only, not on the order they are read in.
    Returns the texts and the stats of the whole pass.
    """
    pieces, stats = plan_pieces(cfg)
    salt = int(splitmix64_outputs(seed, 1)[0])
    heap: list[tuple[int, str, int]] = []  # (-key, text, UTF-8 bytes): the largest key on top
    total = 0
    for doc in iter_documents(_progress(pieces, "sample", progress), cfg, stats):
        key = int(splitmix64_mix(np.uint64(int.from_bytes(doc.sha256[:8], "big") ^ salt)))
        if heap and total >= sample_bytes and key >= -heap[0][0]:
            continue
        size = len(doc.text.encode("utf-8"))
        heapq.heappush(heap, (-key, doc.text, size))
        total += size
        while total - heap[0][2] >= sample_bytes:
            total -= heapq.heappop(heap)[2]
    return [text for _, text, _ in sorted(heap, reverse=True)], stats


def _progress(pieces: list[Piece], desc: str, enabled: bool) -> Iterator[Piece]:
    """``pieces``, with a bar of the bytes handed out."""
    with tqdm(total=sum(p.size for p in pieces), unit="B", unit_scale=True, desc=desc, disable=not enabled) as bar:
        for piece in pieces:
            yield piece
            bar.update(piece.size)


def _skip(stats: CorpusStats, reason: str) -> None:
    """Count one thing skipped for ``reason``, keeping the reasons sorted."""
    if reason not in stats.skipped:
        items = sorted({**stats.skipped, reason: 0}.items())
        stats.skipped.clear()
        stats.skipped.update(items)
    stats.skipped[reason] += 1


# --- resolving inputs -------------------------------------------------------------------------


def _resolve_inputs(cfg: CorpusConfig, skipped: Counter[str]) -> list[tuple[fsspec.AbstractFileSystem, str, int]]:
    """(filesystem, path, size in bytes) of every input file, in order, each file once."""
    out, seen = [], set()
    for url in cfg.inputs:
        fs, path = filesystem(url)
        # a path that exists is taken literally, even with glob characters in its name
        if any(c in path for c in "*?[") and not fs.exists(path):
            matches = fs.glob(path, detail=True)
            if not matches:
                raise DataPrepError(f"input {url}: no file matches this pattern")
            candidates = []
            for match, info in sorted(matches.items()):
                candidates += _walk(fs, match, cfg, skipped) if info["type"] == "directory" else [(match, info)]
        elif fs.isdir(path):
            candidates = _walk(fs, path, cfg, skipped)
        elif fs.isfile(path):
            candidates = [(path, fs.info(path))]
        else:
            raise DataPrepError(f"input {url}: no such file or directory")
        for p, info in candidates:
            key = fs.unstrip_protocol(p)
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            out.append((fs, p, int(info.get("size") or 0)))
    return out


def _walk(fs: fsspec.AbstractFileSystem, path: str, cfg: CorpusConfig,
          skipped: Counter[str]) -> list[tuple[str, dict[str, Any]]]:
    """(path, fsspec info) of the files under directory ``path`` with one of ``cfg.extensions``, sorted."""
    files = []
    for p, info in sorted(fs.find(path, detail=True).items()):
        if p.endswith(tuple(cfg.extensions)):
            files.append((p, info))
        else:
            skipped["extension"] += 1
    return files


def _jsonl_pieces(path: str, url: str, size: int, piece_bytes: int) -> list[Piece]:
    """An uncompressed JSON-lines file as byte ranges of equal length, about ``piece_bytes`` each."""
    n = -(-size // piece_bytes)
    if path.endswith(_COMPRESSED_SUFFIXES) or n <= 1:
        return [Piece(url, "jsonl", size)]
    bounds = [size * i // n for i in range(n + 1)]
    return [Piece(url, "jsonl", b - a, a, b if b < size else None) for a, b in zip(bounds, bounds[1:])]


def _parquet_pieces(fs: fsspec.AbstractFileSystem, path: str, url: str, size: int, piece_bytes: int) -> list[Piece]:
    """A parquet file as ranges of row groups of about ``piece_bytes`` compressed bytes."""
    if size <= piece_bytes:
        return [Piece(url, "parquet", size)]
    pa, pq = _pyarrow(url)
    with _open(fs, path, url) as f:
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _bad_parquet(url, exc) from None
    sizes = [sum(g.column(j).total_compressed_size for j in range(g.num_columns))
             for g in map(meta.row_group, range(meta.num_row_groups))]
    pieces, first, acc = [], 0, 0
    for i, n in enumerate(sizes):
        if acc and acc + n > piece_bytes:
            pieces.append(Piece(url, "parquet", acc, first, i))
            first, acc = i, 0
        acc += n
    pieces.append(Piece(url, "parquet", acc, first, None))
    return pieces


# --- reading ----------------------------------------------------------------------------------


def _open(fs: fsspec.AbstractFileSystem, path: str, url: str):
    try:
        return fs.open(path, "rb")
    except (OSError, ValueError) as exc:
        raise DataPrepError(f"cannot read input {url}: {exc}") from None


def _read_whole(fs: fsspec.AbstractFileSystem, path: str, url: str) -> bytes:
    try:
        return fs.cat_file(path)
    except (OSError, ValueError) as exc:
        raise DataPrepError(f"cannot read input {url}: {exc}") from None


def _read_ahead(pieces: Iterable[Piece]) -> Iterator[tuple[Piece, fsspec.AbstractFileSystem, str, Future | None]]:
    """Each piece with its filesystem, path, and a future of its bytes where it is a small whole file
    on a remote store (fetched by threads up to ``_PREFETCH_AHEAD`` pieces ahead); local files and
    larger pieces are read by the caller in turn, where threads would only add overhead."""
    pool: ThreadPoolExecutor | None = None
    window: deque[tuple[Piece, fsspec.AbstractFileSystem, str, Future | None]] = deque()
    try:
        for piece in pieces:
            fs, path = filesystem(piece.url)
            fetched = None
            if piece.kind == "text" and piece.size <= _PREFETCH_FILE_BYTES and not isinstance(fs, LocalFileSystem):
                pool = pool or ThreadPoolExecutor(_READ_THREADS)
                fetched = pool.submit(_read_whole, fs, path, piece.url)
            window.append((piece, fs, path, fetched))
            if len(window) > _PREFETCH_AHEAD:
                yield window.popleft()
        while window:
            yield window.popleft()
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


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


def _text_documents(url: str, data: bytes, stats: CorpusStats) -> Iterator[Document]:
    """The one document of a plain-text file (none for a binary file)."""
    if b"\0" in data:
        _skip(stats, "binary")
        return
    text, utf8 = _decode(data, stats)
    yield Document(url, None, text, hashlib.sha256(utf8).digest())


def _json_document(source: str, offset: int, text: str, stats: CorpusStats) -> Document:
    """The Document of a JSON string, whose lone surrogates (``\\ud800`` escapes) are replaced."""
    try:
        utf8 = text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        stats.undecodable_documents += 1
        stats.undecodable_sequences += fixed.count("\ufffd") - text.count("\ufffd")
        text, utf8 = fixed, fixed.encode("utf-8")
    return Document(source, offset, text, hashlib.sha256(utf8).digest())


def _jsonl_documents(fs: fsspec.AbstractFileSystem, path: str, piece: Piece, cfg: CorpusConfig,
                     stats: CorpusStats) -> Iterator[Document]:
    """The documents of the lines of a JSON-lines piece."""
    url = piece.url
    compressed = path.endswith(_COMPRESSED_SUFFIXES)
    where = " of the decompressed text" if compressed else ""
    with _open(fs, path, url) as f:
        if path.endswith(".gz"):
            blocks = _gzip_blocks(f, url)
        elif path.endswith(".zst"):
            blocks = _zstd_blocks(f, url)
        else:
            blocks = _plain_blocks(f, url, max(piece.start - 1, 0))
        lineno = 0
        for offset, raw in _lines(blocks, max(piece.start - 1, 0), piece.stop, skip_first=piece.start > 0):
            lineno += 1
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
                    at = (f"{url} line {lineno}: {problem}; the line starts at byte {offset}{where}"
                          if piece.start == 0 else f"{url}, the line at byte {offset}{where}: {problem}")
                    raise DataPrepError(f"{at} (pass --skip-bad-json to skip such lines)")
                _skip(stats, "bad_json")
                continue
            yield _json_document(url, offset, record[cfg.text_field], stats)


def _lines(blocks: Iterator[bytes], pos: int, stop: int | None, skip_first: bool) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) of the lines in ``blocks``, a stream starting at byte ``pos``.

    With ``skip_first`` the bytes up to the first newline are dropped (they end a line that started
    before ``pos + 1``, the start of the range). Lines starting at or after ``stop`` are left out;
    the last one started before it is read to its end. A last line without a newline is kept; the
    empty "line" after a final newline is not.
    """
    pending: list[bytes] = []  # the parts of the line being read, not yet ended by a newline
    line_pos = pos
    for block in blocks:
        if skip_first:
            i = block.find(b"\n")
            if i < 0:
                line_pos += len(block)
                continue
            skip_first = False
            line_pos += i + 1
            block = block[i + 1:]
        parts = block.split(b"\n")
        if len(parts) == 1:
            pending.append(block)
            continue
        pending.append(parts[0])
        parts[0] = b"".join(pending)
        pending = [parts.pop()]
        for line in parts:
            if stop is not None and line_pos >= stop:
                return
            yield line_pos, line
            line_pos += len(line) + 1
        if stop is not None and line_pos >= stop:
            return
    last = b"".join(pending)
    if last and (stop is None or line_pos < stop):
        yield line_pos, last


def _plain_blocks(f, url: str, start: int) -> Iterator[bytes]:
    """The bytes of an uncompressed file from byte ``start``, a read block at a time."""
    try:
        f.seek(start)
        while block := f.read(_READ_BLOCK):
            yield block
    except (OSError, ValueError) as exc:
        raise DataPrepError(f"cannot read input {url}: {exc}") from None


def _gzip_blocks(f, url: str) -> Iterator[bytes]:
    """The decompressed bytes of a gzip file (all its members), a read block at a time."""
    stream = gzip.GzipFile(fileobj=f, mode="rb")
    try:
        while block := stream.read(_READ_BLOCK):
            yield block
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataPrepError(f"cannot read input {url}: not a valid gzip file: {exc}") from None
    except OSError as exc:
        raise DataPrepError(f"cannot read input {url}: {exc}") from None


def _zstd_blocks(f, url: str) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file (all its frames), about a read block at a time.

    zstandard's stream reader ends silently on a truncated frame, so frames are fed to decompressor
    objects, whose end of frame is checked; as these return all the output of their input, the input
    is fed in amounts scaled by the last compression ratio seen, to give about ``_READ_BLOCK`` each
    (text compressed a few hundred times over must not decompress a whole file at once).
    """
    try:
        import zstandard
    except ImportError:
        raise DataPrepError(f"{url}: reading zstd needs zstandard: {_EXTRAS}") from None
    dctx = zstandard.ZstdDecompressor()
    least, amount, most = _ZSTD_INPUT_BLOCKS
    frame, fed = dctx.decompressobj(), False
    try:
        while data := f.read(amount):
            chunk, produced = data, 0
            while chunk:
                block = frame.decompress(chunk)
                fed, chunk, produced = True, b"", produced + len(block)
                if block:
                    yield block
                if frame.eof:
                    chunk = frame.unused_data
                    frame, fed = dctx.decompressobj(), False
            # at most doubled each time: a frame's first block may give little, and not the ratio to go by
            estimate = _READ_BLOCK * len(data) // produced if produced else most
            amount = min(max(estimate, least), 2 * amount, most)
    except zstandard.ZstdError as exc:
        raise DataPrepError(f"cannot read input {url}: not a valid zstd file: {exc}") from None
    except OSError as exc:
        raise DataPrepError(f"cannot read input {url}: {exc}") from None
    if fed:
        raise DataPrepError(f"cannot read input {url}: not a valid zstd file: the stream is truncated")


def _pyarrow(url: str):
    """(pyarrow, pyarrow.parquet), imported on first use."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataPrepError(f"{url}: reading parquet needs pyarrow: {_EXTRAS}") from None
    return pyarrow, pyarrow.parquet


def _bad_parquet(url: str, exc: Exception) -> DataPrepError:
    return DataPrepError(f"cannot read input {url}: not a valid parquet file: {exc}")


def _parquet_documents(fs: fsspec.AbstractFileSystem, path: str, piece: Piece, column: str,
                       stats: CorpusStats) -> Iterator[Document]:
    """The documents of the rows of a parquet piece, from its string column ``column`` only."""
    pa, pq = _pyarrow(piece.url)
    url = piece.url
    with _open(fs, path, url) as f:
        try:
            pf = pq.ParquetFile(f, buffer_size=_PARQUET_BUFFER, pre_buffer=False)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _bad_parquet(url, exc) from None
        if column not in schema.names:
            raise DataPrepError(f"{url}: no column {column!r} to read documents from "
                                f"(the columns are: {', '.join(schema.names)})")
        kind = schema.field(column).type
        if pa.types.is_large_string(kind):
            as_bytes = pa.large_binary()
        elif pa.types.is_string(kind):
            as_bytes = pa.binary()
        else:
            raise DataPrepError(f"{url}: column {column!r} holds {kind}, not strings")
        stop = pf.metadata.num_row_groups if piece.stop is None else piece.stop
        if piece.start >= stop:
            return
        row = sum(pf.metadata.row_group(i).num_rows for i in range(piece.start))
        batches = pf.iter_batches(batch_size=_PARQUET_ROWS, row_groups=list(range(piece.start, stop)),
                                  columns=[column], use_threads=False)
        while True:
            try:
                batch = next(batches, None)
                values = None if batch is None else batch.column(0).cast(as_bytes).to_pylist()
            except (pa.ArrowException, OSError, ValueError) as exc:  # a corrupt page
                raise _bad_parquet(url, exc) from None
            if values is None:
                return
            for value in values:
                if value is None:
                    _skip(stats, "null_text")
                else:
                    text, utf8 = _decode(value, stats)
                    yield Document(url, row, text, hashlib.sha256(utf8).digest())
                row += 1
