"""Layout of one shard: a plain USTAR tar of WebDataset samples, one window per sample.

Format version 2 (``data_prep shards`` writes it): sample ``j`` of a shard of task ``t`` whose first
window is the task's window ``first`` has the WebDataset key ``{t:05d}-{first + j:012d}`` (the task
and the window's index in that task's stream of the split) and two fields, two tar members:

    {key}.tokens.npy   a NumPy ``.npy`` array of shape ``(seq_len + 1,)`` in the manifest's dtype,
                       little-endian
    {key}.crc32        the CRC-32 (zlib) of that array's little-endian bytes: 8 lowercase hex digits

Version 1 (still read): key ``{window:012d}`` (the window's index in the split), the tokens member only.

Every member has the same size and fixed metadata (mtime 0, uid/gid 0, no user names, mode 0444), so
a shard's bytes are a function of its windows alone and sample ``j`` starts at byte
``j * sample_bytes``. Writer and readers share this module, so the layout is stated once.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from typing import Iterator

import numpy as np

KEY_DIGITS = 12
TASK_DIGITS = 5
FIELD = "tokens.npy"
CRC_FIELD = "crc32"
_BLOCK = tarfile.BLOCKSIZE
_CRC_MEMBER_BYTES = 2 * _BLOCK  # header + 8 hex digits padded to a block


class DatasetError(ValueError):
    """A dataset file (shard, documents list, tokenizer copy) is missing, corrupt, or disagrees with
    the manifest; the message names the file."""


def sample_key(window: int, task: int | None = None) -> str:
    """WebDataset key of the sample holding ``window``: its index in the split (version 1, ``task``
    None) or in task ``task``'s stream of the split (version 2)."""
    return f"{window:0{KEY_DIGITS}d}" if task is None else f"{task:0{TASK_DIGITS}d}-{window:0{KEY_DIGITS}d}"


def sample_name(window: int, task: int | None = None) -> str:
    """Tar member name of the tokens of the sample holding ``window`` (see ``sample_key``)."""
    return f"{sample_key(window, task)}.{FIELD}"


def window_crc(window: np.ndarray) -> int:
    """CRC-32 of a window's tokens as stored (little-endian bytes); no copy of a window already stored so."""
    return zlib.crc32(np.ascontiguousarray(window, dtype=window.dtype.newbyteorder("<")))


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


def sample_bytes(seq_len: int, dtype: str, crc: bool) -> int:
    """Bytes one sample occupies in the tar: header block plus the payload padded to 512, plus the
    CRC member in version 2 (``crc``)."""
    return _BLOCK + -(-payload_bytes(seq_len, dtype) // _BLOCK) * _BLOCK + (_CRC_MEMBER_BYTES if crc else 0)


def pack_shard(windows: np.ndarray, first_window: int, task: int | None = None) -> bytearray:
    """The tar bytes of a shard, exactly as ``tarfile`` in USTAR format writes them (``shard_blocks`` joined).

    windows: (n, seq_len + 1) integer array, already in the dataset dtype.
    first_window: index of ``windows[0]`` in task ``task``'s stream of the split (version 2), or in the
    split when ``task`` is None (version 1: no CRC members).
    """
    return bytearray().join(shard_blocks(windows, first_window, task))


def shard_blocks(windows: np.ndarray, first_window: int, task: int | None = None,
                 block_windows: int = 1024) -> Iterator[bytearray]:
    """The tar bytes of a shard (see ``pack_shard``) in consecutive blocks of ``block_windows`` samples,
    then the end of the archive: a writer streams a shard with memory of one block, whatever its size.

    Member headers differ only in the name and its checksum, so one header is built with ``tarfile``
    and patched per member: tarfile's own per-member cost would be a noticeable share of the shards
    job (tests compare both).
    """
    n, width = windows.shape
    if first_window + n > 10**KEY_DIGITS:
        raise ValueError(f"window index {first_window + n - 1} has more than {KEY_DIGITS} digits")
    npy = npy_header(width - 1, windows.dtype.str)
    le = windows.astype(windows.dtype.newbyteorder("<"), copy=False)
    tokens = _MemberHeader(sample_name(first_window, task), len(npy) + le[0].nbytes if n else 0)
    crc = _MemberHeader(f"{sample_key(first_window, task)}.{CRC_FIELD}", 8) if task is not None else None
    stride = sample_bytes(width - 1, windows.dtype.str, crc is not None)
    crc_at = _BLOCK + -(-tokens.size // _BLOCK) * _BLOCK
    for lo in range(0, n, block_windows):
        hi = min(lo + block_windows, n)
        out = bytearray((hi - lo) * stride)  # the block, filled in place
        samples = np.frombuffer(out, dtype=np.uint8).reshape(hi - lo, stride)
        samples[:, _BLOCK:_BLOCK + len(npy)] = np.frombuffer(npy, dtype=np.uint8)
        samples[:, _BLOCK + len(npy):_BLOCK + tokens.size] = le[lo:hi].reshape(hi - lo, -1).view(np.uint8)
        for j in range(lo, hi):
            key = sample_key(first_window + j, task)
            samples[j - lo, :_BLOCK] = np.frombuffer(tokens.header(f"{key}.{FIELD}"), dtype=np.uint8)
            if crc is not None:
                samples[j - lo, crc_at:crc_at + _BLOCK] = np.frombuffer(crc.header(f"{key}.{CRC_FIELD}"), np.uint8)
                samples[j - lo, crc_at + _BLOCK:crc_at + _BLOCK + 8] = np.frombuffer(b"%08x" % window_crc(le[j]),
                                                                                    np.uint8)
        del samples
        yield out
    # End of archive: two zero blocks, then zeros up to a whole tar record, as tarfile does.
    body = n * stride + 2 * _BLOCK
    yield bytearray(2 * _BLOCK + -body % tarfile.RECORDSIZE)


class _MemberHeader:
    """The USTAR header of a member of ``size`` bytes, its name patched in for each member (names of one
    shard have one length)."""

    def __init__(self, name: str, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        self.block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
        self.size, self.name_len = size, len(name)
        # USTAR checksum: the sum of the header's bytes with the 8-byte checksum field read as spaces.
        self.base = sum(self.block[:148]) + sum(self.block[156:]) + 8 * 32 - sum(self.block[:self.name_len])

    def header(self, name: str) -> bytes:
        raw = name.encode("ascii")
        self.block[:self.name_len] = raw
        self.block[148:155] = b"%06o\0" % (self.base + sum(raw))
        return bytes(self.block)


def unpack_payload(payload: bytes, seq_len: int, dtype: str, where: str) -> np.ndarray:
    """The window stored in one sample's ``.npy`` bytes; shape (seq_len + 1,)."""
    header = npy_header(seq_len, dtype)
    if len(payload) != payload_bytes(seq_len, dtype) or not payload.startswith(header):
        raise DatasetError(
            f"{where}: sample is not a ({seq_len + 1},) {dtype} array "
            f"({len(payload)} bytes, expected {payload_bytes(seq_len, dtype)})"
        )
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"), offset=len(header))


def check_crc(window: np.ndarray, crc: bytes, where: str) -> None:
    """Raise DatasetError naming ``where`` unless ``crc`` (a CRC member's bytes) is ``window``'s CRC-32."""
    computed = "%08x" % window_crc(window)
    if crc[:8] != computed.encode():
        raise DatasetError(f"{where}: the tokens do not match their CRC-32 (stored "
                           f"{crc[:8].decode('ascii', 'replace')!r}, computed {computed}): the shard is corrupt; "
                           f"rewrite the dataset or restore the shard")


def unpack_sample(block: bytes, window: int, seq_len: int, dtype: str, where: str, task: int | None = None) -> np.ndarray:
    """The window in one sample's raw tar bytes (``sample_bytes`` long, header first); its CRC-32 is
    checked in version 2 (``task`` given; ``window`` is then the task's window index, see ``sample_key``)."""
    name = block[:100].rstrip(b"\0").decode("ascii", "replace")
    if name != sample_name(window, task):
        raise DatasetError(f"{where}: expected member {sample_name(window, task)}, found {name!r}")
    size = payload_bytes(seq_len, dtype)
    tokens = unpack_payload(block[_BLOCK:_BLOCK + size], seq_len, dtype, where)
    if task is not None:
        crc_at = _BLOCK + -(-size // _BLOCK) * _BLOCK
        crc_name = block[crc_at:crc_at + 100].rstrip(b"\0").decode("ascii", "replace")
        if crc_name != f"{sample_key(window, task)}.{CRC_FIELD}":
            raise DatasetError(f"{where}: expected member {sample_key(window, task)}.{CRC_FIELD}, found {crc_name!r}")
        check_crc(tokens, block[crc_at + _BLOCK:crc_at + _BLOCK + 8], where)
    return tokens


def unpack_shard(data: bytes, first_window: int, seq_len: int, dtype: str, where: str,
                 task: int | None = None) -> np.ndarray:
    """All windows of a shard, checking names, order, the fixed-stride layout and (version 2) every CRC.

    Returns an (n, seq_len + 1) array; raises DatasetError naming ``where`` on any deviation.
    """
    stride = sample_bytes(seq_len, dtype, crc=task is not None)
    windows = []
    while len(windows) * stride < len(data) and data[len(windows) * stride] != 0:  # a member header, not the end
        j = len(windows)
        if (j + 1) * stride > len(data):
            raise DatasetError(f"{where}: truncated, sample {j} is incomplete")
        windows.append(unpack_sample(data[j * stride:(j + 1) * stride], first_window + j, seq_len, dtype,
                                     f"{where} sample {j}", task))
    n = len(windows)
    try:  # what follows the samples: the end-of-archive blocks, nothing else
        with tarfile.open(fileobj=io.BytesIO(data[n * stride:]), mode="r:") as tar:
            extra = tar.getmembers()
    except tarfile.TarError as exc:
        raise DatasetError(f"{where}: not a readable tar after sample {n}: {exc}") from None
    if extra:
        raise DatasetError(f"{where}: member {extra[0].name!r} at byte {n * stride} is not a whole sample")
    if not windows:
        return np.zeros((0, seq_len + 1), dtype=dtype)
    return np.stack(windows)
