"""Read windows of a token-shard dataset from any fsspec URL: one at random, or streamed in order.

``iter_shard_samples`` is the streaming half for any fixed-stride tar shards (the token shards here,
the neighbour sidecar's in ``zarvan_dist.data.neighbours``).
"""

from __future__ import annotations

import tarfile
from typing import Callable, Iterator, Sequence

import fsspec
import numpy as np

from zarvan_dist.data.manifest import Manifest, dataset_root
from zarvan_dist.data.shards import (
    CRC_FIELD,
    FIELD,
    DatasetError,
    check_crc,
    sample_key,
    unpack_payload,
    unpack_sample,
)


def check_sample(sample: dict, window: int, fields: Sequence[str], where: str, key: str | None = None) -> None:
    """Raise DatasetError naming ``where`` unless the webdataset ``sample`` is ``window``'s (key ``key``, by
    default ``sample_key(window)``) with ``fields``."""
    key = sample_key(window) if key is None else key
    if sample["__key__"] != key or not all(f in sample for f in fields):
        raise DatasetError(f"{where}: expected window {window} (key {key}) with field{'s' * (len(fields) > 1)} "
                           f"{' and '.join(fields)}, found key {sample['__key__']!r}")


def iter_shard_samples(fs: fsspec.AbstractFileSystem, shards: Sequence[tuple[str, str]], offset: int,
                       stride: int, start: int, end: int, fields: Sequence[str], listing: str,
                       label: str, key_of: Callable[[int], str] = sample_key,
                       counts: Sequence[int] | None = None) -> Iterator[tuple[str, dict]]:
    """The webdataset samples of windows ``start, ..., end - 1``, streamed from tar shards in order.

    shards: (URL, path in ``fs``) of each shard from the one holding window ``start`` on; it is opened
    at byte ``offset * stride`` (samples are ``stride`` bytes, ``offset`` windows precede ``start``
    in it), so nothing before ``start`` is read. ``key_of(window)`` is the key window ``window`` must
    have (default: ``sample_key``). Yields (where, sample): ``where`` names the shard URL
    and the sample, for the caller's errors. Every error is a DatasetError: a missing shard names its
    URL and ``listing``, the file that lists it (e.g. "manifest"); a wrong key or field names the
    sample and the window expected; a tar error names ``label`` (e.g. "split train") and the window
    being read and the shard being read; a count other than ``end - start`` names ``label``,
    ``start`` and ``listing``. ``counts``: the windows each shard holds (the first's from ``offset`` on);
    given, a shard that ends early (a tar ends quietly at a damaged header or a cut between members) is
    named with both counts when the stream leaves it, not left to surface as a wrong key in the next one
    (the last shard: named before the count of the whole).
    """

    # here, not at the top: webdataset imports torch, which the data jobs (and their workers) need not load
    from webdataset.tariterators import group_by_keys, tar_file_expander

    current = shards[0][0] if shards else label  # the shard being read, for tar errors

    def check_count(k: int, first: int) -> None:
        # called when the stream leaves shard k: every sample of it has been checked by then
        if counts is not None and window - first != counts[k]:
            raise DatasetError(f"{shards[k][0]}: the shard ends after {window - first} of its {counts[k]} windows "
                               f"from window {first} (the {listing}'s count): it is truncated or corrupt")

    def streams() -> Iterator[dict]:
        nonlocal current
        first = start
        for k, (url, path) in enumerate(shards):
            if k:
                check_count(k - 1, first)
                first = window
            current = url
            try:
                stream = fs.open(path, "rb")
            except FileNotFoundError:
                raise DatasetError(f"{url}: shard listed in the {listing} is missing") from None
            with stream:
                if k == 0 and offset:
                    stream.seek(offset * stride)
                yield {"url": url, "stream": stream}

    window = start
    try:
        for sample in group_by_keys(tar_file_expander(streams())):
            where = f"{sample['__url__']} sample {sample['__key__']}"
            check_sample(sample, window, fields, where, key_of(window))
            yield where, sample
            window += 1
    except (tarfile.TarError, OSError) as exc:
        # webdataset appends " @ <file object>" and more arguments; the shard's URL says which file
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        raise DatasetError(f"{label}, reading window {window}: {current}: {reason}") from None
    if window != end:  # with ``counts``, every shard but the last had its count: the last is short
        culprit = f"{shards[-1][0]}: " if counts is not None and shards else ""
        raise DatasetError(f"{culprit}{label}: shards held {window - start} windows from window {start}, "
                           f"the {listing} says {end - start}")


def check_ids(window: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise DatasetError naming ``where`` unless every id of ``window`` is below ``vocab_size``."""
    if window.size and np.maximum.reduce(window) >= vocab_size:  # the ufunc itself: less dispatch than .max()
        at = int(np.argmax(window >= vocab_size))
        raise DatasetError(f"{where}: token id {int(window[at])} at position {at} is not below the vocabulary size "
                           f"{vocab_size}: the shard is corrupt; rewrite the dataset or restore the shard")


class WindowReader:
    """Windows of the dataset at ``url`` (its directory or manifest URL).

    Each window is a (seq_len + 1,) array of the manifest's dtype; consecutive windows of a split
    share one token (``w[i][-1] == w[i + 1][0]``). Each window read is checked: its CRC-32 (version 2)
    and every id below the manifest's ``vocab_size``, a DatasetError naming the shard and sample
    otherwise. ``check=False`` skips both in ``iter_windows`` (only to measure what they cost:
    benchmarks/bench_loader.py); ``check_ids=False`` leaves the ids to a caller that checks many
    windows at once (the lane loader checks each micro-step's windows in one pass).
    """

    def __init__(self, url: str, check: bool = True, check_ids: bool = True):
        self.root = dataset_root(url)
        self.manifest = Manifest.load(url)
        self.check, self.check_ids = check, check_ids
        self.fs, root_path = fsspec.core.url_to_fs(self.root)
        self._root_path = root_path.rstrip("/")

    def url(self, rel: str) -> str:
        """Full URL of a file of the dataset given by its manifest path (relative to DIR)."""
        return f"{self.root}/{rel}"

    def fs_path(self, rel: str) -> str:
        """Path of a dataset file within ``self.fs``."""
        return f"{self._root_path}/{rel}"

    def read(self, split: str, window: int) -> np.ndarray:
        """Window ``window`` of ``split`` with one ranged read of its shard."""
        m = self.manifest
        shard, offset = m.locate(split, window)
        stride = m.sample_bytes
        where = self.url(shard.path)
        try:
            block = self.fs.cat_file(self.fs_path(shard.path), start=offset * stride, end=(offset + 1) * stride)
        except FileNotFoundError:
            raise DatasetError(f"{where}: shard listed in the manifest is missing") from None
        if len(block) != stride:
            raise DatasetError(f"{where}: truncated, sample {offset} is incomplete")
        key_window, task = m.window_key(split, window)
        tokens = unpack_sample(block, key_window, m.seq_len, m.dtype, f"{where} sample {offset}", task)
        check_ids(tokens, m.vocab_size, f"{where} sample {offset}")
        return tokens

    def iter_windows(self, split: str, start: int = 0) -> Iterator[np.ndarray]:
        """Windows ``start, start + 1, ...`` of ``split`` to its end, streamed with webdataset.

        The first shard is opened at the byte where window ``start`` begins (samples have a fixed
        size), so starting a lane in the middle of a shard reads nothing before it.
        """
        m = self.manifest
        entry = m.split(split)
        if start == entry.windows:
            return
        first_shard, offset = m.locate_index(split, start)
        shards = [(self.url(s.path), self.fs_path(s.path)) for s in entry.shards[first_shard:]]
        counts = [s.windows for s in entry.shards[first_shard:]]
        counts[0] -= offset
        fields = (FIELD, CRC_FIELD) if m.has_crc else (FIELD,)
        samples = iter_shard_samples(self.fs, shards, offset, m.sample_bytes, start, entry.windows, fields,
                                     "manifest", f"split {split}", lambda window: sample_key(*m.window_key(split, window)),
                                     counts)
        for where, sample in samples:
            tokens = unpack_payload(sample[FIELD], m.seq_len, m.dtype, where)
            if self.check:
                if m.has_crc:
                    check_crc(tokens, sample[CRC_FIELD], where)
                if self.check_ids:
                    check_ids(tokens, m.vocab_size, where)
            yield tokens
