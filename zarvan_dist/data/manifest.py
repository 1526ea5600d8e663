"""The manifest of a token-shard dataset: what ``data_prep shards`` wrote and how to find a window.

A dataset directory ``DIR`` holds ``manifest.json``, the tokenizer and shards of consecutive windows.
The manifest is the only thing a reader needs: window ``i`` of a split lives in the shard whose
cumulative window range contains ``i``, at sample offset ``i - first``. Its JSON layout is these
dataclasses, field for field (see ``Manifest.to_json``).

Version 2 (written by ``data_prep shards``) comes from ``tasks`` independent tasks: each task has its
own stream per split, cut into its own shards (``DIR/tasks/TTTTT/SPLIT/shard-KKKKKK.tar``); a split is
the tasks' windows in task order, so at a task boundary the next window starts a new document (its
BOS) rather than continuing the previous window. Each sample carries a CRC-32 of its tokens
(``zarvan_dist.data.shards``). Version 1 (one stream per split, ``DIR/SPLIT/shard-KKKKKK.tar``, no
CRC) is still read.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec

from zarvan_dist.config import ConfigError, from_dict, to_dict
from zarvan_dist.data.shards import sample_bytes

FORMAT = "zarvan-token-shards"
FORMAT_VERSION = 2
VERSIONS = (1, 2)
"""Versions this reader knows (see the module docstring)."""
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"


def dtype_for_vocab(vocab_size: int) -> str:
    """Token dtype of the shards: ``uint16`` when every id fits in 16 bits, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass
class ShardEntry:
    """One shard: a tar of consecutive windows."""

    path: str
    """Location relative to the dataset directory, e.g. ``train/shard-000000.tar``."""
    windows: int
    """Number of windows (samples) in the shard."""
    tokens: int
    """Tokens stored in the shard: ``windows * (seq_len + 1)`` (the shared edge token counts twice)."""
    bytes: int
    """Size of the tar file in bytes."""
    sha256: str
    """Hex sha256 of the whole tar file."""
    task: int | None = None
    """Version 2: the task that wrote the shard."""
    first_key: int | None = None
    """Version 2: index of the shard's first window in its task's stream of the split (sample keys
    ``{task:05d}-{first_key + j:012d}``)."""


@dataclass
class SplitEntry:
    """One split's token stream, cut into windows and shards."""

    documents: int
    """Documents listed in ``documents_path`` (each starts with BOS)."""
    tokens: int
    """Tokens in the stream, BOS included: ``windows * seq_len + 1 + tail_tokens`` when windows > 0 (version 2:
    summed over the tasks' streams, the ``+ 1`` once per task with windows)."""
    windows: int
    """Windows of ``seq_len + 1`` tokens; window i starts at stream token ``i * seq_len`` (of its task's stream)."""
    tail_tokens: int
    """Tokens at the end of the stream (of each task's) that fill no whole window: counted here, not written."""
    documents_path: str
    """JSON-lines list of the stream's documents in order (source, offset or line, sha256), relative to DIR:
    version 2 lists the documents whose BOS is written (a reader of the windows meets exactly these, in
    order); version 1 also lists those of the tail."""
    documents_sha256: str
    """Hex sha256 of the documents file."""
    shards: list[ShardEntry] = field(default_factory=list)
    """Shards in stream order."""
    tail_documents: int = 0
    """Version 2: documents that start in a task's tail (counted in ``tail_tokens``, not listed)."""


@dataclass
class Splits:
    """The two splits; a split with no documents has no windows and no shards."""

    train: SplitEntry
    """Training stream."""
    val: SplitEntry
    """Validation stream (documents chosen by a stable hash of their text)."""


@dataclass
class TokenizerEntry:
    """The sentencepiece model the shards were encoded with (a copy lives in DIR)."""

    path: str
    """Location of the copy relative to DIR."""
    sha256: str
    """Hex sha256 of the model file."""
    source: str
    """Where the model was read from when the shards were written."""


@dataclass
class Manifest:
    """Contents of ``manifest.json``; ``locate`` maps a window index to (shard, offset)."""

    format: str
    """Always ``zarvan-token-shards``."""
    version: int
    """Layout version of this format."""
    seq_len: int
    """Tokens a model sees per window; a window stores ``seq_len + 1`` tokens."""
    vocab_size: int
    """Size of the tokenizer's vocabulary; every id is below it."""
    dtype: Literal["uint16", "uint32"]
    """Token dtype in the shards, little-endian."""
    bos_id: int
    """Id that starts every document."""
    eos_id: int
    """End-of-sequence id (defined by the tokenizer, not written into the stream)."""
    pad_id: int
    """Padding id (defined by the tokenizer, not written into the stream)."""
    unk_id: int
    """Unknown-piece id (never produced: the tokenizer falls back to bytes)."""
    tokenizer: TokenizerEntry
    """The tokenizer model and its hash."""
    windows_per_shard: int
    """Windows in every shard but a split's last, which may hold fewer."""
    sample_bytes: int
    """Bytes one sample occupies in a tar: sample j of a shard starts at byte ``j * sample_bytes``."""
    splits: Splits
    """Per-split streams and shards."""
    corpus: dict[str, Any] = field(default_factory=dict)
    """What was read: files, documents, skipped files by reason, undecodable bytes replaced."""
    job: dict[str, Any] = field(default_factory=dict)
    """The job configuration that produced the shards; a re-run with another one is refused."""
    tasks: int = 1
    """Version 2: the tasks the job was split into."""

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ConfigError(f"format: expected {FORMAT!r}, got {self.format!r}")
        if self.version not in VERSIONS:
            raise ConfigError(f"version: this reader knows {', '.join(map(str, VERSIONS))}, got {self.version}; "
                              f"write the dataset again with this version's `python -m data_prep shards`")
        if self.seq_len < 1:
            raise ConfigError(f"seq_len: expected a positive integer, got {self.seq_len}")
        if self.dtype != dtype_for_vocab(self.vocab_size):
            raise ConfigError(
                f"dtype: {self.dtype} does not match vocab_size {self.vocab_size} "
                f"(expected {dtype_for_vocab(self.vocab_size)})"
            )
        if self.sample_bytes != sample_bytes(self.seq_len, self.dtype, crc=self.has_crc):
            raise ConfigError(f"sample_bytes: {self.sample_bytes} does not match seq_len {self.seq_len}, "
                              f"dtype {self.dtype} and version {self.version}")
        self._first_windows: dict[str, list[int]] = {}
        for name in SPLITS:
            split = self.split(name)
            starts, total = [], 0
            for k, shard in enumerate(split.shards):
                if shard.tokens != shard.windows * (self.seq_len + 1):
                    raise ConfigError(
                        f"splits.{name}.shards[{k}].tokens: {shard.tokens} != windows {shard.windows}"
                        f" x (seq_len + 1)"
                    )
                if self.has_crc and (shard.task is None or shard.first_key is None):
                    raise ConfigError(f"splits.{name}.shards[{k}]: version {self.version} needs task and first_key")
                starts.append(total)
                total += shard.windows
            if total != split.windows:
                raise ConfigError(
                    f"splits.{name}.windows: {split.windows}, but its shards hold {total} windows"
                )
            streams = len({shard.task for shard in split.shards if shard.windows})  # tasks with windows (v1: one)
            if split.windows and split.tokens != split.windows * self.seq_len + streams + split.tail_tokens:
                raise ConfigError(
                    f"splits.{name}.tokens: {split.tokens} != windows x seq_len + 1 (per task with windows) "
                    f"+ tail_tokens"
                )
            self._first_windows[name] = starts

    @property
    def has_crc(self) -> bool:
        """Whether samples carry a CRC-32 of their tokens (version 2)."""
        return self.version >= 2

    def window_key(self, split: str, window: int) -> tuple[int, int | None]:
        """(key window, task) of ``window`` of ``split`` for ``zarvan_dist.data.shards.sample_key``: the
        window's index in its task's stream and the task (version 2), or the window and None (version 1)."""
        k, offset = self.locate_index(split, window)
        shard = self.split(split).shards[k]
        return (window, None) if not self.has_crc else (shard.first_key + offset, shard.task)

    def streams(self, split: str) -> list[range]:
        """The window ranges of ``split``'s streams in order: one per task with windows (version 1: one).
        Within a stream consecutive windows share a token; the next stream starts anew (with a BOS)."""
        out: list[range] = []
        for k, shard in enumerate(self.split(split).shards):
            first = self.first_window(split, k)
            if out and self.same_stream(split, k):
                out[-1] = range(out[-1].start, first + shard.windows)
            elif shard.windows:
                out.append(range(first, first + shard.windows))
        return out

    def same_stream(self, split: str, shard_index: int) -> bool:
        """Whether shard ``shard_index`` of ``split`` continues the stream of the shard before it (the same
        task): its first window then starts with the previous window's last token."""
        shards = self.split(split).shards
        return shard_index > 0 and shards[shard_index].task == shards[shard_index - 1].task

    def split(self, name: str) -> SplitEntry:
        """The entry of split ``name`` (``train`` or ``val``)."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return getattr(self.splits, name)

    def locate(self, split: str, window: int) -> tuple[ShardEntry, int]:
        """The shard holding ``window`` of ``split`` and the window's sample offset in it."""
        k, offset = self.locate_index(split, window)
        return self.split(split).shards[k], offset

    def locate_index(self, split: str, window: int) -> tuple[int, int]:
        """Like ``locate``, with the shard given by its position in the split's shard list."""
        entry = self.split(split)
        if not 0 <= window < entry.windows:
            raise IndexError(f"window {window} out of range: split {split} has {entry.windows} windows")
        starts = self._first_windows[split]
        k = bisect.bisect_right(starts, window) - 1
        return k, window - starts[k]

    def first_window(self, split: str, shard_index: int) -> int:
        """Global index (within ``split``) of the first window of shard ``shard_index``."""
        return self._first_windows[split][shard_index]

    def to_json(self) -> str:
        """The manifest as deterministic, human-readable JSON text."""
        return json.dumps(to_dict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        """Parse manifest JSON; errors name ``source`` and the offending key."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc}") from None
        try:
            return from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, url: str) -> Manifest:
        """Read the manifest of the dataset at ``url`` (its directory or its manifest.json)."""
        path = manifest_url(url)
        return cls.from_json(read_text(path, "no manifest (is this a dataset written by data_prep shards?)"), path)


def read_text(path: str, missing: str) -> str:
    """The text of the JSON file at fsspec URL ``path``; a ConfigError naming it, with ``missing`` as the
    explanation when there is no such file."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None


def manifest_url(url: str) -> str:
    """URL of the manifest file of the dataset given by its directory or manifest URL."""
    url = url.rstrip("/")
    return url if url.endswith(".json") else f"{url}/{MANIFEST_NAME}"


def dataset_root(url: str) -> str:
    """URL of the dataset directory given by its directory or manifest URL."""
    url = url.rstrip("/")
    return url.rsplit("/", 1)[0] if url.endswith(".json") else url

