"""zarvan_dist.data: the manifest's window -> (shard, offset) map and the shard reader, on their own."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib

import numpy as np
import pytest

from data_prep.corpus import seeded_permutation
from data_prep.verify import verify_dataset
from zarvan_dist.config import ConfigError, to_dict
from zarvan_dist.data import Manifest, ShardEntry, DatasetError, SplitEntry, Splits, TokenizerEntry, WindowReader
from zarvan_dist.data.manifest import dtype_for_vocab
from zarvan_dist.data.shards import npy_header, pack_shard, sample_bytes, sample_key, sample_name, unpack_shard


def _build(root, windows_per_shard: int, n_windows: int, seq_len: int = 5, vocab: int = 70_000) -> np.ndarray:
    """Write a hand-made dataset (train only, format version 1: version 2 is what data_prep writes, and
    version 1 must still read) straight from pack_shard; return its token stream."""
    dtype = dtype_for_vocab(vocab)
    stream = (np.arange(n_windows * seq_len + 1) * 7919 % vocab).astype(dtype)
    (root / "train").mkdir(parents=True)
    (root / "tokenizer.model").write_bytes(b"stand-in")
    (root / "train" / "documents.jsonl").write_bytes(b"")
    (root / "val" ).mkdir()
    (root / "val" / "documents.jsonl").write_bytes(b"")
    empty = hashlib.sha256(b"").hexdigest()
    shards = []
    for k, first in enumerate(range(0, n_windows, windows_per_shard)):
        n = min(windows_per_shard, n_windows - first)
        w = np.lib.stride_tricks.sliding_window_view(stream[first * seq_len:(first + n) * seq_len + 1], seq_len + 1)[::seq_len]
        data = pack_shard(w, first)
        path = f"train/shard-{k:06d}.tar"
        (root / path).write_bytes(data)
        shards.append(ShardEntry(path, n, n * (seq_len + 1), len(data), hashlib.sha256(data).hexdigest()))
    m = Manifest(
        format="zarvan-token-shards", version=1, seq_len=seq_len, vocab_size=vocab, dtype=dtype,
        bos_id=1, eos_id=2, pad_id=3, unk_id=0,
        tokenizer=TokenizerEntry("tokenizer.model", hashlib.sha256(b"stand-in").hexdigest(), "test"),
        windows_per_shard=windows_per_shard, sample_bytes=sample_bytes(seq_len, dtype, crc=False),
        splits=Splits(
            train=SplitEntry(0, len(stream), n_windows, 0, "train/documents.jsonl", empty, shards),
            val=SplitEntry(0, 0, 0, 0, "val/documents.jsonl", empty, []),
        ),
    )
    (root / "manifest.json").write_text(m.to_json())
    return stream


def test_locate_maps_windows_across_shards(tmp_path):
    _build(tmp_path, windows_per_shard=4, n_windows=10)
    m = Manifest.load(str(tmp_path))
    got = [(m.locate("train", i)[0].path[-10:-4], m.locate("train", i)[1]) for i in range(10)]
    assert got == [("000000", 0), ("000000", 1), ("000000", 2), ("000000", 3), ("000001", 0),
                   ("000001", 1), ("000001", 2), ("000001", 3), ("000002", 0), ("000002", 1)]
    with pytest.raises(IndexError, match="window 10 out of range: split train has 10 windows"):
        m.locate("train", 10)
    with pytest.raises(IndexError):
        m.locate("val", 0)


def test_uint32_windows_read_back_by_range_and_by_stream(tmp_path):
    """A dataset written the old way (format version 1) still reads, by range and by stream, and verifies."""
    stream = _build(tmp_path, windows_per_shard=3, n_windows=8, vocab=70_000)
    reader = WindowReader(str(tmp_path / "manifest.json"))
    assert reader.manifest.dtype == "uint32" and stream.max() > 65535
    expected = [stream[i * 5:i * 5 + 6] for i in range(8)]
    for i in range(8):
        np.testing.assert_array_equal(reader.read("train", i), expected[i])
    streamed = list(reader.iter_windows("train", start=2))
    assert len(streamed) == 6 and all(np.array_equal(a, b) for a, b in zip(streamed, expected[2:]))
    assert verify_dataset(str(tmp_path), progress=False)["windows"] == 8


def test_reader_names_a_truncated_shard(tmp_path):
    _build(tmp_path, windows_per_shard=3, n_windows=8)
    shard = tmp_path / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:600])
    reader = WindowReader(str(tmp_path))
    with pytest.raises(DatasetError, match=r"shard-000002\.tar: truncated"):
        reader.read("train", 7)
    with pytest.raises(DatasetError, match=r"shard-000002\.tar"):
        list(reader.iter_windows("train"))


def test_manifest_errors_name_the_key(tmp_path):
    _build(tmp_path, windows_per_shard=4, n_windows=10)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    bad = dict(raw, dtype="uint16")
    with pytest.raises(ConfigError, match="dtype: uint16 does not match vocab_size 70000"):
        Manifest.from_json(json.dumps(bad), "m.json")
    bad = json.loads(json.dumps(raw))
    bad["splits"]["train"]["shards"][1]["tokens"] = 1
    with pytest.raises(ConfigError, match=r"splits\.train\.shards\[1\]\.tokens"):
        Manifest.from_json(json.dumps(bad), "m.json")
    with pytest.raises(ConfigError, match="m.json: unknown key 'extra'"):
        Manifest.from_json(json.dumps(dict(raw, extra=1)), "m.json")
    with pytest.raises(ConfigError, match="no manifest"):
        Manifest.load(str(tmp_path / "elsewhere"))
    assert to_dict(Manifest.from_json(json.dumps(raw), "m.json")) == raw


def test_dtype_follows_vocab_size():
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"


def _splitmix64(seed: int, i: int) -> int:
    """Output i + 1 of splitmix64 seeded with ``seed``, in Python integers."""
    mask = (1 << 64) - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_seeded_permutation_matches_a_plain_statement():
    for seed in (0, 7, 2**40 + 3):
        p = seeded_permutation(500, seed)
        assert p.tolist() == sorted(range(500), key=lambda i: _splitmix64(seed, i))
    assert not np.array_equal(seeded_permutation(500, 7), seeded_permutation(500, 8))
    # Pinned, so that a change of the shuffle (which reorders every dataset) cannot pass unseen.
    assert seeded_permutation(8, 0).tolist() == [2, 4, 6, 5, 1, 7, 0, 3]


def _tarfile_shard(windows: np.ndarray, first: int, task: int | None) -> bytes:
    """The shard layout written member by member with tarfile: the reference for pack_shard (version 2
    with ``task``: each window's tokens, then its CRC-32 as 8 hex digits)."""
    header = npy_header(windows.shape[1] - 1, windows.dtype.str)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j, w in enumerate(windows):
            members = [(sample_name(first + j, task), header + w.tobytes())]
            if task is not None:
                members.append((f"{sample_key(first + j, task)}.crc32", b"%08x" % zlib.crc32(w.tobytes())))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("task", [None, 0, 12345])
@pytest.mark.parametrize("n, seq_len, dtype, first", [
    (1, 1, np.uint16, 0), (5, 32, np.uint16, 0), (40, 1024, np.uint16, 99_990), (7, 5, np.uint32, 123_456_789),
])
def test_pack_shard_matches_tarfile(n, seq_len, dtype, first, task):
    windows = np.random.default_rng(0).integers(0, 60_000, (n, seq_len + 1)).astype(dtype)
    data = pack_shard(windows, first, task)
    assert data == _tarfile_shard(windows, first, task)
    stride = sample_bytes(seq_len, np.dtype(dtype).name, crc=task is not None)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [m.offset for m in tar][::1 if task is None else 2] == [j * stride for j in range(n)]
    assert unpack_shard(data, first, seq_len, np.dtype(dtype).name, "shard", task).tolist() == windows.tolist()


def test_a_flipped_token_byte_is_caught_by_its_crc():
    windows = np.arange(3 * 33, dtype=np.uint16).reshape(3, 33)
    data = bytearray(pack_shard(windows, 7, task=2))
    stride = sample_bytes(32, "uint16", crc=True)
    data[stride + 512 + 128 + 10] ^= 0x01  # a token of the second window, still below any vocabulary
    with pytest.raises(DatasetError, match=r"shard sample 1: the tokens do not match their CRC-32"):
        unpack_shard(bytes(data), 7, 32, "uint16", "shard", task=2)
