"""Writing through fsspec so that no reader ever sees a partial file."""

from __future__ import annotations

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
