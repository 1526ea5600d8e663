"""Corpus formats: text, JSON lines (plain, gzip, zstd) and parquet read back exactly, whatever the
piece size, in bounded memory; corrupt inputs named; the seeded sample of the tokenizer job."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep import DataPrepError
from data_prep.corpus import CorpusConfig, iter_documents, plan_pieces, read_corpus, sample_documents
from prep_helpers import write_files

TEXTS = [
    "plain ascii prose.\n",
    "line one\r\nline two\r\n\r\n",
    "na\u00efve caf\u00e9 \u2014 \u4e2d\u6587 \U0001F600\n",
    "\u2581 meta \u2581\u2581 mark",
    "",
    "tabs\tand  spaces   ",
    "x" * 3000,
    "last one",
]
ROW_GROUP = 2


def _jsonl(texts: list[str]) -> tuple[bytes, list[int]]:
    """JSON lines of ``texts`` (with a blank line, a CRLF ending and no final newline) and each line's offset."""
    data, offsets = b"", []
    for i, text in enumerate(texts):
        if i == 2:
            data += b"\n  \n"
        offsets.append(len(data))
        data += json.dumps({"id": i, "text": text}).encode() + (b"\r\n" if i == 1 else b"\n")
    return data[:-1], offsets


def _parquet(texts: list[str | None]) -> bytes:
    table = pa.table({"id": list(range(len(texts))), "text": texts, "meta": ["m"] * len(texts)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP)
    return sink.getvalue().to_pybytes()


def corpus(root: str) -> tuple[dict[str, bytes], list[tuple[str, int | None, str]]]:
    """Write one file of each format under ``root``; return the files and the documents expected from
    them, as (file name, offset, text), in reading order."""
    lines, offsets = _jsonl(TEXTS)
    half = lines.index(b"\n", len(lines) // 2) + 1
    cctx = zstandard.ZstdCompressor()
    files = {
        "a.jsonl": lines,
        "b.jsonl.gz": gzip.compress(lines),
        "c.jsonl.zst": cctx.compress(lines[:half]) + cctx.compress(lines[half:]),  # two frames
        "d.parquet": _parquet(TEXTS + [None]),
        "e.txt": TEXTS[1].encode(),
        "f.md": TEXTS[2].encode(),
    }
    write_files(root, files)
    expected = []
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        expected += [(name, o, t) for o, t in zip(offsets, TEXTS) if t]
    expected += [("d.parquet", i, t) for i, t in enumerate(TEXTS) if t]
    expected += [("e.txt", None, TEXTS[1]), ("f.md", None, TEXTS[2])]
    return files, expected


def _triples(docs) -> list[tuple[str, int | None, str]]:
    return [(d.source.rsplit("/", 1)[1], d.offset, d.text) for d in docs]


def test_every_format_reads_back_exactly(tmp_path):
    files, expected = corpus(str(tmp_path))
    docs, stats = read_corpus(CorpusConfig(inputs=[str(tmp_path)]), progress=False)
    assert _triples(docs) == expected
    assert all(d.sha256 == hashlib.sha256(d.text.encode()).digest() for d in docs)
    assert docs[0].source == f"file://{tmp_path}/a.jsonl" and docs[0].offset == 0
    assert stats.files == len(files) and stats.documents == len(expected)
    assert stats.skipped == {"empty": 4, "null_text": 1}


def test_remote_store_reads_the_same_documents(tmp_path, memory_root):
    _, expected = corpus(memory_root)
    docs, stats = read_corpus(CorpusConfig(inputs=[f"{memory_root}/*"]), progress=False)
    assert _triples(docs) == expected
    assert docs[0].source.startswith("memory://")


@pytest.mark.parametrize("piece_bytes", [1, 7, 100, 1 << 30])
def test_piece_size_does_not_change_the_documents(tmp_path, piece_bytes):
    files, expected = corpus(str(tmp_path))
    cfg = CorpusConfig(inputs=[str(tmp_path)])
    pieces, stats = plan_pieces(cfg, piece_bytes)
    assert pieces == plan_pieces(cfg, piece_bytes)[0]
    for name, data in files.items():
        mine = [p for p in pieces if p.url.endswith("/" + name)]
        assert mine[0].start == 0 and mine[-1].stop is None
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:]))
        if name == "a.jsonl":
            assert len(mine) == -(-len(data) // piece_bytes) and sum(p.size for p in mine) == len(data)
        elif name == "d.parquet" and piece_bytes == 1:
            assert [(p.start, p.stop) for p in mine] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, None)]
        elif name != "d.parquet":
            assert len(mine) == 1 and mine[0].size == len(data)
    docs = list(iter_documents(pieces, cfg, stats))
    assert _triples(docs) == expected
    assert stats.files == len(files) and stats.documents == len(expected)
    assert stats.skipped == {"empty": 4, "null_text": 1}


def test_byte_ranges_hold_every_line_once(tmp_path):
    """Random line lengths, blank lines and a last line without newline, cut at every possible size."""
    rng = random.Random(0)
    texts = ["".join(rng.choice("ab\u00e9 ") for _ in range(rng.randint(1, 40))) for _ in range(60)]
    data, offsets = _jsonl(texts)
    (tmp_path / "r.jsonl").write_bytes(data)
    cfg = CorpusConfig(inputs=[str(tmp_path / "r.jsonl")])
    for piece_bytes in range(1, 90):
        pieces, stats = plan_pieces(cfg, piece_bytes)
        docs = list(iter_documents(pieces, cfg, stats))
        assert [(d.offset, d.text) for d in docs] == list(zip(offsets, texts)), piece_bytes


def test_max_docs_stops_across_pieces(tmp_path):
    _, expected = corpus(str(tmp_path))
    cfg = CorpusConfig(inputs=[str(tmp_path)], max_docs=9)
    pieces, stats = plan_pieces(cfg, 5)
    assert _triples(iter_documents(pieces, cfg, stats)) == expected[:9]
    assert stats.documents == 9


def test_corrupt_parquet_is_named(tmp_path):
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file at all" * 10)
    with pytest.raises(DataPrepError, match=r"garbage\.parquet: not a valid parquet file"):
        read_corpus(CorpusConfig(inputs=[str(tmp_path / "garbage.parquet")]), progress=False)
    data = _parquet(TEXTS)
    (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])
    cfg = CorpusConfig(inputs=[str(tmp_path / "cut.parquet")])
    with pytest.raises(DataPrepError, match=r"cut\.parquet: not a valid parquet file"):
        read_corpus(cfg, progress=False)
    with pytest.raises(DataPrepError, match=r"cut\.parquet: not a valid parquet file"):
        plan_pieces(cfg, piece_bytes=1)  # large enough to be cut: its footer is read while planning


def test_parquet_column_must_exist_and_hold_strings(tmp_path):
    (tmp_path / "d.parquet").write_bytes(_parquet(TEXTS))
    with pytest.raises(DataPrepError, match=r"d\.parquet: no column 'body'.*\(the columns are: id, text, meta\)"):
        read_corpus(CorpusConfig(inputs=[str(tmp_path)], text_field="body"), progress=False)
    with pytest.raises(DataPrepError, match=r"d\.parquet: column 'id' holds int64, not strings"):
        read_corpus(CorpusConfig(inputs=[str(tmp_path)], text_field="id"), progress=False)


def test_truncated_or_corrupt_zstd_is_named(tmp_path):
    data = zstandard.ZstdCompressor().compress(_jsonl(TEXTS)[0] * 20)
    for name, content in (("cut.jsonl.zst", data[:len(data) // 2]), ("tail.json.zst", data[:-4]),
                          ("junk.jsonl.zst", b"no zstd here" * 10)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataPrepError, match=rf"{name.replace('.', '[.]')}: not a valid zstd file"):
            read_corpus(CorpusConfig(inputs=[str(tmp_path / name)]), progress=False)


def test_bad_json_line_names_its_byte_offset(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    lines[30] = '{"text": oops}'
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "x.jsonl").write_bytes(data)
    at = data.index(b"oops") - len('{"text": ')
    cfg = CorpusConfig(inputs=[str(tmp_path / "x.jsonl")])
    with pytest.raises(DataPrepError, match=rf"x\.jsonl line 31: malformed JSON .*starts at byte {at} "):
        read_corpus(cfg, progress=False)
    pieces, stats = plan_pieces(cfg, piece_bytes=100)
    with pytest.raises(DataPrepError, match=rf"x\.jsonl, the line at byte {at}: malformed JSON"):
        list(iter_documents(pieces, cfg, stats))
    cfg.skip_bad_json = True
    pieces, stats = plan_pieces(cfg, piece_bytes=100)
    assert len(list(iter_documents(pieces, cfg, stats))) == 39 and stats.skipped == {"bad_json": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_memory_stays_bounded_on_a_large_file(tmp_path, suffix):
    """About 50 MB of JSON lines stream with a peak of Python allocations far below the file size."""
    rng = random.Random(0)
    words = [rng.randbytes(rng.randint(2, 8)).hex() for _ in range(500)]
    bodies = [" ".join(rng.choices(words, k=90)) for _ in range(100)]
    lines = [json.dumps({"text": f"{i} {bodies[i % 100]}"}) + "\n" for i in range(50_000)]
    data = "".join(lines).encode()
    del lines
    size = len(data)
    if suffix == ".jsonl.gz":
        data = gzip.compress(data, compresslevel=1)
    elif suffix == ".jsonl.zst":
        data = zstandard.ZstdCompressor(level=1).compress(data)
    path = tmp_path / f"big{suffix}"
    path.write_bytes(data)
    del data
    cfg = CorpusConfig(inputs=[str(path)])
    pieces, stats = plan_pieces(cfg)
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_documents(pieces, cfg, stats))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 50_000 and size > 45_000_000
    assert peak < 20_000_000, f"peak {peak:,} bytes while reading {size:,}"


def _sample_corpus(root: Path) -> list[str]:
    rng = random.Random(1)
    texts = [f"document {i}: " + "word " * rng.randint(1, 60) for i in range(200)]
    write_files(str(root), {f"{'one' if i % 2 else 'two'}/{i:03d}.txt": t.encode() for i, t in enumerate(texts)})
    return texts


def test_sample_is_seeded_sized_and_independent_of_input_order(tmp_path):
    texts = _sample_corpus(tmp_path)
    forward = CorpusConfig(inputs=[str(tmp_path / "one"), str(tmp_path / "two")])
    backward = CorpusConfig(inputs=[str(tmp_path / "two"), str(tmp_path / "one")])
    everything, stats = sample_documents(forward, 1 << 30, seed=3, progress=False)
    assert sorted(everything) == sorted(texts) and stats.documents == 200
    sample, _ = sample_documents(forward, 5000, seed=3, progress=False)
    assert sample == sample_documents(backward, 5000, seed=3, progress=False)[0]
    assert sample == sample_documents(forward, 5000, seed=3, progress=False)[0]
    # the shortest run of the seeded order that reaches the size
    sizes = [len(t.encode()) for t in sample]
    assert sample == everything[:len(sample)]
    assert sum(sizes) >= 5000 > sum(sizes[:-1])
    assert sample != sample_documents(forward, 5000, seed=4, progress=False)[0]
