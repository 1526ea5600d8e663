"""Read windows of a token-shard dataset from any fsspec URL: one at random, or streamed in order."""

from __future__ import annotations

import tarfile
from typing import Iterator

import fsspec
import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from zarvan_dist.data.manifest import Manifest, dataset_root
from zarvan_dist.data.shards import (
    FIELD,
    DatasetError,
    sample_bytes,
    sample_key,
    unpack_payload,
    unpack_sample,
)


class WindowReader:
    """Windows of the dataset at ``url`` (its directory or manifest URL).

    Each window is a (seq_len + 1,) array of the manifest's dtype; consecutive windows of a split
    share one token (``w[i][-1] == w[i + 1][0]``).
    """

    def __init__(self, url: str):
        self.root = dataset_root(url)
        self.manifest = Manifest.load(url)
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
        stride = sample_bytes(m.seq_len, m.dtype)
        where = self.url(shard.path)
        try:
            block = self.fs.cat_file(self.fs_path(shard.path), start=offset * stride, end=(offset + 1) * stride)
        except FileNotFoundError:
            raise DatasetError(f"{where}: shard listed in the manifest is missing") from None
        if len(block) != stride:
            raise DatasetError(f"{where}: truncated, sample {offset} is incomplete")
        return unpack_sample(block, window, m.seq_len, m.dtype, where)

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
        stride = sample_bytes(m.seq_len, m.dtype)

        def streams() -> Iterator[dict]:
            for k, shard in enumerate(entry.shards[first_shard:]):
                url = self.url(shard.path)
                try:
                    stream = self.fs.open(self.fs_path(shard.path), "rb")
                except FileNotFoundError:
                    raise DatasetError(f"{url}: shard listed in the manifest is missing") from None
                with stream:
                    if k == 0 and offset:
                        stream.seek(offset * stride)
                    yield {"url": url, "stream": stream}

        samples = group_by_keys(tar_file_expander(streams()))
        window = start
        try:
            for sample in samples:
                where = f"{sample['__url__']} sample {sample['__key__']}"
                if sample["__key__"] != sample_key(window) or FIELD not in sample:
                    raise DatasetError(f"{where}: expected window {window} with field {FIELD}")
                yield unpack_payload(sample[FIELD], m.seq_len, m.dtype, where)
                window += 1
        except (tarfile.TarError, OSError) as exc:
            raise DatasetError(f"split {split}, reading window {window}: {exc}") from None
        if window != entry.windows:
            raise DatasetError(f"split {split}: shards held {window - start} windows from window {start}, "
                               f"manifest says {entry.windows - start}")
