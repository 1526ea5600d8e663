"""Layout of one shard: a plain USTAR tar of WebDataset samples, one window per sample.

Sample ``j`` of a shard whose first window is ``first`` is the tar member
``{first + j:012d}.tokens.npy`` — WebDataset key ``{first + j:012d}`` (the window's index in its
split), field ``tokens.npy`` — holding a NumPy ``.npy`` array of shape ``(seq_len + 1,)`` in the
manifest's dtype, little-endian. Every member has the same size and fixed metadata (mtime 0,
uid/gid 0, no user names, mode 0444), so a shard's bytes are a function of its windows alone and
sample ``j`` starts at byte ``j * sample_bytes`` (header 512 bytes, then the ``.npy`` file).
Writer and readers share this module, so the layout is stated once.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np

KEY_DIGITS = 12
FIELD = "tokens.npy"
_BLOCK = tarfile.BLOCKSIZE


class DatasetError(ValueError):
    """A dataset file (shard, documents list, tokenizer copy) is missing, corrupt, or disagrees with
    the manifest; the message names the file."""


def sample_key(window: int) -> str:
    """WebDataset key of the sample holding ``window`` (its index within the split)."""
    return f"{window:0{KEY_DIGITS}d}"


def sample_name(window: int) -> str:
    """Tar member name of the sample holding ``window``."""
    return f"{sample_key(window)}.{FIELD}"


def npy_header(seq_len: int, dtype: str) -> bytes:
    """The ``.npy`` header every sample of a dataset starts with (128 bytes for these shapes)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out,
        {"descr": np.dtype(dtype).newbyteorder("<").str, "fortran_order": False, "shape": (seq_len + 1,)},
    )
    return out.getvalue()


def payload_bytes(seq_len: int, dtype: str) -> int:
    """Size of one sample's ``.npy`` file in bytes."""
    return len(npy_header(seq_len, dtype)) + (seq_len + 1) * np.dtype(dtype).itemsize


def sample_bytes(seq_len: int, dtype: str) -> int:
    """Bytes one sample occupies in the tar: header block plus the payload padded to 512."""
    return _BLOCK + -(-payload_bytes(seq_len, dtype) // _BLOCK) * _BLOCK


def pack_shard(windows: np.ndarray, first_window: int) -> bytes:
    """The tar bytes of a shard, exactly as ``tarfile`` in USTAR format writes them.

    windows: (n, seq_len + 1) integer array, already in the dataset dtype.
    first_window: split-level index of ``windows[0]``.
    Member headers differ only in the name and its checksum, so one header is built with
    ``tarfile`` and patched per member: tarfile's own per-member cost would be a noticeable
    share of the shards job (tests compare both).
    """
    n, width = windows.shape
    if first_window + n > 10**KEY_DIGITS:
        raise ValueError(f"window index {first_window + n - 1} has more than {KEY_DIGITS} digits")
    npy = npy_header(width - 1, windows.dtype.str)
    le = windows.astype(windows.dtype.newbyteorder("<"), copy=False)
    size = len(npy) + le[0].nbytes if n else 0
    pad = bytes(-size % _BLOCK)
    info = tarfile.TarInfo(sample_name(first_window))
    info.size, info.mtime, info.mode = size, 0, 0o444
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    name_len = len(sample_name(first_window))
    # USTAR checksum: the sum of the header's bytes with the 8-byte checksum field read as spaces.
    base = sum(header[:148]) + sum(header[156:]) + 8 * 32 - sum(header[:name_len])
    parts = []
    for j in range(n):
        name = sample_name(first_window + j).encode("ascii")
        header[:name_len] = name
        header[148:155] = b"%06o\0" % (base + sum(name))
        parts += [bytes(header), npy, le[j].tobytes(), pad]
    # End of archive: two zero blocks, then zeros up to a whole tar record, as tarfile does.
    body = sum(map(len, parts)) + 2 * _BLOCK
    parts.append(bytes(2 * _BLOCK + -body % tarfile.RECORDSIZE))
    return b"".join(parts)


def unpack_payload(payload: bytes, seq_len: int, dtype: str, where: str) -> np.ndarray:
    """The window stored in one sample's ``.npy`` bytes; shape (seq_len + 1,)."""
    header = npy_header(seq_len, dtype)
    if len(payload) != payload_bytes(seq_len, dtype) or not payload.startswith(header):
        raise DatasetError(
            f"{where}: sample is not a ({seq_len + 1},) {dtype} array "
            f"({len(payload)} bytes, expected {payload_bytes(seq_len, dtype)})"
        )
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"), offset=len(header))


def unpack_sample(block: bytes, window: int, seq_len: int, dtype: str, where: str) -> np.ndarray:
    """The window in one sample's raw tar bytes (``sample_bytes`` long, header first)."""
    name = block[:100].rstrip(b"\0").decode("ascii", "replace")
    if name != sample_name(window):
        raise DatasetError(f"{where}: expected member {sample_name(window)}, found {name!r}")
    start = _BLOCK
    return unpack_payload(block[start:start + payload_bytes(seq_len, dtype)], seq_len, dtype, where)


def unpack_shard(data: bytes, first_window: int, seq_len: int, dtype: str, where: str) -> np.ndarray:
    """All windows of a shard, checking names, order and the fixed-stride layout.

    Returns an (n, seq_len + 1) array; raises DatasetError naming ``where`` on any deviation.
    """
    stride = sample_bytes(seq_len, dtype)
    windows = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for j, member in enumerate(tar):
                expected = sample_name(first_window + j)
                if member.name != expected or member.offset != j * stride:
                    raise DatasetError(
                        f"{where}: member {j} is {member.name!r} at byte {member.offset}, "
                        f"expected {expected} at byte {j * stride}"
                    )
                payload = tar.extractfile(member).read()
                windows.append(unpack_payload(payload, seq_len, dtype, f"{where} member {member.name}"))
    except tarfile.TarError as exc:
        raise DatasetError(f"{where}: not a readable tar: {exc}") from None
    if not windows:
        return np.zeros((0, seq_len + 1), dtype=dtype)
    return np.stack(windows)
