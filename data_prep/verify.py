"""The ``verify`` job: every file of a dataset checked against its manifest."""

from __future__ import annotations

import hashlib

import numpy as np
from tqdm import tqdm

from zarvan_dist.data.manifest import SPLITS
from zarvan_dist.data.reader import WindowReader
from zarvan_dist.data.shards import DatasetError, unpack_shard


def verify_dataset(url: str, progress: bool = True) -> dict:
    """Check the dataset at ``url``; raise DatasetError naming the first file that disagrees.

    Per shard: size, sha256, then the content itself (member names and layout, every window's CRC-32
    in version 2, window count, token count, ids below vocab_size, and each window's first token equal
    to the previous window's last within a task's stream). Also the tokenizer copy and the documents
    lists. Returns totals of what was checked.
    """
    reader = WindowReader(url)
    m = reader.manifest
    _check_file(reader, m.tokenizer.path, m.tokenizer.sha256, None)
    totals = {"shards": 0, "windows": 0, "tokens": 0, "bytes": 0}
    for name in SPLITS:
        split = m.split(name)
        lines = _check_file(reader, split.documents_path, split.documents_sha256, None).count(b"\n")
        if lines != split.documents:
            raise DatasetError(f"{reader.url(split.documents_path)}: {lines} documents, manifest says {split.documents}")
        last = None
        for k, shard in enumerate(tqdm(split.shards, desc=f"verify {name}", unit="shard", disable=not progress)):
            where = reader.url(shard.path)
            data = _check_file(reader, shard.path, shard.sha256, shard.bytes)
            first = m.first_window(name, k)
            key_window, task = m.window_key(name, first) if shard.windows else (first, shard.task)
            windows = unpack_shard(data, key_window, m.seq_len, m.dtype, where, task)
            if len(windows) != shard.windows or windows.size != shard.tokens:
                raise DatasetError(
                    f"{where}: {len(windows)} windows / {windows.size} tokens, "
                    f"manifest says {shard.windows} / {shard.tokens}"
                )
            if windows.size and int(windows.max()) >= m.vocab_size:
                raise DatasetError(f"{where}: token id {int(windows.max())} >= vocab_size {m.vocab_size}")
            if last is not None and m.same_stream(name, k) and windows[0, 0] != last:
                raise DatasetError(f"{where}: window {first} does not start with the previous shard's last token")
            bad = np.flatnonzero(windows[1:, 0] != windows[:-1, -1])
            if len(bad):
                raise DatasetError(f"{where}: window {first + int(bad[0]) + 1} does not start with the "
                                 f"previous window's last token")
            last = windows[-1, -1]
            totals["shards"] += 1
            totals["windows"] += shard.windows
            totals["tokens"] += shard.tokens
            totals["bytes"] += shard.bytes
    return totals


def _check_file(reader: WindowReader, rel: str, sha256: str, size: int | None) -> bytes:
    """Bytes of a dataset file after checking its size (when given) and sha256."""
    where = reader.url(rel)
    try:
        data = reader.fs.cat_file(reader.fs_path(rel))
    except FileNotFoundError:
        raise DatasetError(f"{where}: listed in the manifest but missing") from None
    if size is not None and len(data) != size:
        raise DatasetError(f"{where}: {len(data)} bytes, manifest says {size} (truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DatasetError(f"{where}: sha256 {digest} does not match the manifest's {sha256}")
    return data
