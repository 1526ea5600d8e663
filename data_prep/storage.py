"""Writing through fsspec so that no reader ever sees a partial file."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import fsspec

from data_prep import DataPrepError


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of ``url``; an unknown scheme or a missing driver
    (s3fs for s3://, gcsfs for gs://) is an error naming the URL."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise DataPrepError(f"{url}: {exc}") from None


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name (``path + '.tmp'``), then rename it.

    On a local disk the rename is atomic; on object stores (memory://, s3://) it is fsspec's
    ``mv``, which makes the object appear under its final name only once it is complete.
    """
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path + ".tmp", data)
    fs.mv(path + ".tmp", path)


def put_stream_atomic(fs: fsspec.AbstractFileSystem, path: str, blocks: Iterable[bytes]) -> tuple[int, str]:
    """``put_atomic`` of the concatenation of ``blocks``, written as they come (memory: one block);
    returns its size and hex sha256."""
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with fs.open(path + ".tmp", "wb") as f:
        for block in blocks:
            f.write(block)
            h.update(block)
            size += len(block)
    fs.mv(path + ".tmp", path)
    return size, h.hexdigest()


PROGRESS_NAME = "progress.json"
"""A resumable job's journal in its output directory: its configuration (under ``"job"``) and what is done."""


def read_journal(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """The journal in ``root`` as ``save_journal`` wrote it, or None where there is none."""
    path = f"{root}/{PROGRESS_NAME}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def save_journal(fs: fsspec.AbstractFileSystem, root: str, state: dict[str, Any]) -> None:
    """Write the journal ``state`` (JSON data, the job's configuration under ``"job"``) to ``root`` atomically.

    A job saves it after each output file it puts in place, so the journal never names a partial file.
    """
    put_atomic(fs, f"{root}/{PROGRESS_NAME}", (json.dumps(state, indent=1) + "\n").encode())


def load_journal(fs: fsspec.AbstractFileSystem, root: str, url: str, job: dict[str, Any], overwrite: bool,
                 manifest_name: str, fresh: dict[str, Any]) -> dict[str, Any]:
    """The journal of an earlier run of ``job`` in ``root``, or ``{"job": job, **fresh}``.

    Output of another configuration (another journal, or a finished ``manifest_name`` without one)
    is refused, naming ``url``, unless ``overwrite``, which removes it.
    """
    state = read_journal(fs, root)
    if state is not None:
        if state.get("job") == job:
            return state
        if not overwrite:
            raise DataPrepError(f"{url} holds output of another configuration ({PROGRESS_NAME} differs); "
                                f"pass --overwrite to replace it, or choose another --out")
    elif fs.exists(f"{root}/{manifest_name}") and not overwrite:
        raise DataPrepError(f"{url} holds a finished {manifest_name} without a journal; pass --overwrite to replace it")
    if fs.exists(root):
        fs.rm(root, recursive=True)
    return {"job": job, **fresh}


def intact_prefix(fs: fsspec.AbstractFileSystem, root: str, files: list[Any]) -> int:
    """How many of the recorded ``files`` (each with ``path`` relative to ``root`` and ``sha256``), from the
    first, are present with their recorded sha256."""
    for i, f in enumerate(files):
        path = f"{root}/{f.path}"
        if not fs.exists(path) or hashlib.sha256(fs.cat_file(path)).hexdigest() != f.sha256:
            return i
    return len(files)
