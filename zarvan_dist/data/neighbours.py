"""Neighbour sidecar shards: the retrieved text of every window chunk, stored beside the token shards.

``data_prep retrieval neighbours`` writes, for a token dataset ``DIR``, a directory (by default
``DIR/retrieval/neighbours``) holding ``neighbours.json`` (this module's ``NeighbourManifest``)
and, per split, ``{split}/shard-NNNNNN.tar``: sidecar shard k holds exactly the windows of token
shard k. The sample of window i has the WebDataset key of the token sample (``{i:012d}``) and two
fields:

- ``neighbours.npy``: int32 ``[n, K, L]``, for each chunk c of the window's inputs (tokens
  ``[c*C, (c+1)*C)``, ``n = ceil(seq_len / C)``) its K nearest corpus chunks as token ids, each
  the chunk followed by its continuation (``L = 2 * m``), -1 where a chunk or continuation ends
  early (a document's end) or fewer than K neighbours were found;
- ``distances.npy``: float32 ``[n, K]``, squared L2 distance of the two unit embeddings
  (``2 - 2 cos``), ``inf`` for a missing neighbour; nearest first.

The neighbours of chunk c are computed from chunk c's tokens only; the model lets only tokens of
later chunks read them (``nonattn``'s retrieval fusion), so no token sees retrieval computed from
its own future. Every member has a fixed size and fixed metadata (mtime 0, mode 0444), so sample
j of a shard starts at byte ``j * sample_bytes`` and a lane can start reading mid-shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import numpy as np

from zarvan_dist.config import ConfigError, from_dict, to_dict
from zarvan_dist.data.manifest import SPLITS, Manifest, dataset_root, manifest_url, read_text
from zarvan_dist.data.reader import check_sample, iter_shard_samples
from zarvan_dist.data.shards import DatasetError, sample_key

FORMAT = "zarvan-neighbour-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "neighbours.json"
IDS_FIELD = "neighbours.npy"
DIST_FIELD = "distances.npy"
_BLOCK = tarfile.BLOCKSIZE


@dataclass
class NeighbourShard:
    """One sidecar shard: the neighbours of the windows of the token shard with the same index."""

    path: str
    """Location relative to the sidecar directory, e.g. ``train/shard-000000.tar``."""
    windows: int
    """Windows (samples) in the shard; equal to the token shard's."""
    bytes: int
    """Size of the tar file in bytes."""
    sha256: str
    """Hex sha256 of the whole tar file."""


@dataclass
class NeighbourSplit:
    """One split's sidecar shards, in the token shards' order."""

    windows: int
    """Windows of the split; equal to the token split's."""
    shards: list[NeighbourShard] = field(default_factory=list)
    """Shards in stream order."""


@dataclass
class NeighbourSplits:
    """The two splits (a split without windows has no shards)."""

    train: NeighbourSplit
    """Neighbours of the training windows."""
    val: NeighbourSplit
    """Neighbours of the validation windows."""


@dataclass
class NeighbourManifest:
    """Contents of ``neighbours.json``."""

    format: str
    """Always ``zarvan-neighbour-shards``."""
    version: int
    """Layout version of this format."""
    dataset_manifest_sha256: str
    """Hex sha256 of the token dataset's ``manifest.json`` the neighbours belong to."""
    seq_len: int
    """The token dataset's window length (inputs per window)."""
    chunk_len: int
    """C, tokens per query chunk of a window; must equal the model's ``supervisor_chunk``."""
    chunks_per_window: int
    """n = ceil(seq_len / C); the last chunk is shorter when C does not divide seq_len."""
    k: int
    """K, neighbours per chunk."""
    neighbour_len: int
    """L = 2 m, tokens per neighbour (corpus chunk + continuation); the model's ``retrieval_len``."""
    corpus_chunk_len: int
    """m, tokens per corpus chunk."""
    windows_per_shard: int
    """Windows in every shard but a split's last (the token dataset's)."""
    sample_bytes: int
    """Bytes one sample (both fields) occupies in a tar."""
    splits: NeighbourSplits
    """Per-split shards."""
    index: dict[str, Any] = field(default_factory=dict)
    """The FAISS index searched: its location, sha256 and settings."""
    job: dict[str, Any] = field(default_factory=dict)
    """The job configuration that wrote the shards; a re-run with another one is refused."""

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ConfigError(f"format: expected {FORMAT!r}, got {self.format!r}")
        if self.version != FORMAT_VERSION:
            raise ConfigError(f"version: this reader knows {FORMAT_VERSION}, got {self.version}")
        if self.chunks_per_window != -(-self.seq_len // self.chunk_len):
            raise ConfigError(f"chunks_per_window: {self.chunks_per_window} != ceil(seq_len / chunk_len)")
        if self.sample_bytes != sample_bytes(self.chunks_per_window, self.k, self.neighbour_len):
            raise ConfigError(f"sample_bytes: {self.sample_bytes} does not match the sample shapes")

    def split(self, name: str) -> NeighbourSplit:
        """The entry of split ``name``."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return getattr(self.splits, name)

    def to_json(self) -> str:
        """Deterministic, human-readable JSON text."""
        return json.dumps(to_dict(self), indent=2) + "\n"

    @classmethod
    def load(cls, url: str) -> NeighbourManifest:
        """Read the manifest of the sidecar directory at ``url`` (or of its ``neighbours.json``)."""
        path = url if url.rstrip("/").endswith(".json") else f"{url.rstrip('/')}/{MANIFEST_NAME}"
        text = read_text(path, "no neighbour manifest (run `python -m data_prep retrieval neighbours` first)")
        try:
            return from_dict(cls, json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.dtype(dtype).newbyteorder("<").str, "fortran_order": False, "shape": shape})
    return out.getvalue()


def _member_bytes(shape: tuple[int, ...], dtype: str) -> int:
    payload = len(_npy_header(shape, dtype)) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    return _BLOCK + -(-payload // _BLOCK) * _BLOCK


def sample_bytes(chunks: int, k: int, neighbour_len: int) -> int:
    """Bytes of one sample in a sidecar tar: the two members, headers and padding included."""
    return _member_bytes((chunks, k, neighbour_len), "int32") + _member_bytes((chunks, k), "float32")


def _npy(array: np.ndarray) -> bytes:
    le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return _npy_header(array.shape, array.dtype.str) + le.tobytes()


def pack_neighbour_shard(ids: np.ndarray, distances: np.ndarray, first_window: int) -> bytes:
    """The tar bytes of a sidecar shard.

    ids: int32 [w, n, K, L]; distances: float32 [w, n, K]; first_window: split index of ``ids[0]``.
    """
    if ids.dtype != np.int32 or distances.dtype != np.float32 or ids.shape[:3] != distances.shape:
        raise ValueError(f"expected int32 ids [w, n, K, L] and float32 distances [w, n, K], got "
                         f"{ids.dtype} {ids.shape} and {distances.dtype} {distances.shape}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j in range(ids.shape[0]):
            key = sample_key(first_window + j)
            for name, array in ((IDS_FIELD, ids[j]), (DIST_FIELD, distances[j])):
                data = _npy(array)
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _unpack(payload: bytes, shape: tuple[int, ...], dtype: str, where: str) -> np.ndarray:
    header = _npy_header(shape, dtype)
    size = len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(payload) != size or not payload.startswith(header):
        raise DatasetError(f"{where}: expected a {shape} {dtype} array ({size} bytes), got {len(payload)} bytes")
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"), offset=len(header)).reshape(shape)


def manifest_sha256(dataset: str) -> str:
    """Hex sha256 of a token dataset's ``manifest.json`` (what a sidecar is tied to)."""
    with fsspec.open(manifest_url(dataset), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class NeighbourReader:
    """The neighbours of the windows of a token dataset, from its sidecar directory at ``url``.

    Args:
        url: the sidecar directory (or its ``neighbours.json``).
        dataset: the token dataset the neighbours are read for; when given, a sidecar written for
            another dataset (manifest sha256 differs) is an error naming both.
    """

    def __init__(self, url: str, dataset: str | None = None) -> None:
        self.root = url.rstrip("/").rsplit("/", 1)[0] if url.rstrip("/").endswith(".json") else url.rstrip("/")
        self.manifest = NeighbourManifest.load(url)
        self.fs, root_path = fsspec.core.url_to_fs(self.root)
        self._root_path = root_path.rstrip("/")
        m = self.manifest
        self.ids_shape = (m.chunks_per_window, m.k, m.neighbour_len)
        self.dist_shape = (m.chunks_per_window, m.k)
        if dataset is not None:
            tokens = Manifest.load(dataset)
            got = manifest_sha256(dataset)
            if got != m.dataset_manifest_sha256:
                raise ConfigError(
                    f"{self.root}: these neighbours belong to the dataset whose manifest has sha256 "
                    f"{m.dataset_manifest_sha256}, not to {dataset_root(dataset)} ({got}); run "
                    f"`python -m data_prep retrieval neighbours` for this dataset")
            for name in SPLITS:
                if tokens.split(name).windows != m.split(name).windows:
                    raise ConfigError(f"{self.root}: split {name} has {m.split(name).windows} windows, "
                                      f"the dataset {tokens.split(name).windows}")

    def _shard_at(self, split: str, window: int) -> tuple[int, int]:
        entry = self.manifest.split(split)
        if not 0 <= window < entry.windows:
            raise IndexError(f"window {window} out of range: split {split} has {entry.windows} windows")
        return divmod(window, self.manifest.windows_per_shard)

    def read(self, split: str, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, K, L] int32, distances [n, K] float32) of ``window``, with one ranged read."""
        k, offset = self._shard_at(split, window)
        shard = self.manifest.split(split).shards[k]
        stride = self.manifest.sample_bytes
        where = f"{self.root}/{shard.path}"
        try:
            block = self.fs.cat_file(f"{self._root_path}/{shard.path}", start=offset * stride,
                                     end=(offset + 1) * stride)
        except FileNotFoundError:
            raise DatasetError(f"{where}: shard listed in the neighbour manifest is missing") from None
        from webdataset.tariterators import group_by_keys, tar_file_expander  # webdataset imports torch

        samples = list(group_by_keys(tar_file_expander([{"url": where, "stream": io.BytesIO(block + bytes(1024))}])))
        if len(samples) != 1:
            raise DatasetError(f"{where}: sample {offset} is not one complete sample")
        check_sample(samples[0], window, (IDS_FIELD, DIST_FIELD), where)
        return self._arrays(samples[0], where)

    def _arrays(self, sample: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        return (_unpack(sample[IDS_FIELD], self.ids_shape, "int32", where),
                _unpack(sample[DIST_FIELD], self.dist_shape, "float32", where))

    def iter_windows(self, split: str, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The neighbours of windows ``start, start + 1, ...`` of ``split`` to its end, streamed with
        webdataset; the first shard is opened at the byte where window ``start`` begins."""
        entry = self.manifest.split(split)
        if start == entry.windows:
            return
        first, offset = self._shard_at(split, start)
        shards = [(f"{self.root}/{s.path}", f"{self._root_path}/{s.path}") for s in entry.shards[first:]]
        samples = iter_shard_samples(self.fs, shards, offset, self.manifest.sample_bytes, start, entry.windows,
                                     (IDS_FIELD, DIST_FIELD), "neighbour manifest", f"{self.root}: split {split}")
        for where, sample in samples:
            yield self._arrays(sample, where)
