"""Writing through fsspec so that no reader ever sees a partial file."""

from __future__ import annotations

import fsspec


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
