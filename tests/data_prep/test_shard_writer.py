"""The shards job: round trip to the documents, determinism, workers, resume from any journal state."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import data_prep.shards as shards_module
from data_prep import DataPrepError
from data_prep.shards import PROGRESS_NAME
from zarvan_dist.tokenizer import encode_documents, load_tokenizer
from prep_helpers import SEQ_LEN, WINDOWS_PER_SHARD, corpus_files, expected_documents, read_tree
from zarvan_dist.data import SPLITS, Manifest, WindowReader


def _decode_documents(sp, stream: np.ndarray, bos: int) -> list[str]:
    """Texts of a token stream cut at each BOS (the stream starts with one)."""
    starts = np.flatnonzero(stream == bos)
    assert starts[0] == 0
    return [sp.decode(seg[1:].tolist()) for seg in np.split(stream, starts[1:])]


def test_round_trip_gives_back_every_document(make_shards, tmp_path, tokenizer_path):
    out = tmp_path / "ds"
    summary = make_shards(out)
    reader = WindowReader(str(out))
    m = reader.manifest
    sp = load_tokenizer(tokenizer_path).processor
    texts = expected_documents(corpus_files())
    assert summary["corpus"].documents == len(texts)
    assert summary["corpus"].undecodable_documents == 2  # invalid.txt and the lone surrogate
    seen = []
    for name in SPLITS:
        entry = m.split(name)
        order = [json.loads(line)["sha256"] for line in (out / entry.documents_path).read_text().splitlines()]
        docs = [texts[h] for h in order]
        seen += order
        windows = list(reader.iter_windows(name))
        assert len(windows) == entry.windows > 0
        for i, w in enumerate(windows):
            assert w.shape == (SEQ_LEN + 1,) and w.dtype == np.uint16
            if i:
                assert w[0] == windows[i - 1][-1], "consecutive windows share one token"
        stream = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
        assert len(stream) == entry.windows * SEQ_LEN + 1 == entry.tokens - entry.tail_tokens
        assert 0 <= entry.tail_tokens < SEQ_LEN
        # The documents' own encoding: the windows are exactly its head, the dropped tail its rest.
        full, _ = encode_documents(sp, docs, m.dtype)
        assert len(full) == entry.tokens
        np.testing.assert_array_equal(stream, full[:len(stream)])
        assert _decode_documents(sp, np.concatenate([stream, full[len(stream):]]), m.bos_id) == docs
        # Every document that ends inside the windows comes back from the windows alone.
        from_windows = _decode_documents(sp, stream, m.bos_id)
        assert from_windows[:-1] == docs[:len(from_windows) - 1]
        assert summary["splits"][name]["tail_tokens"] == entry.tail_tokens
    assert sorted(seen) == sorted(texts), "each document lands in exactly one split"
    special = {"\u2581", "\r\n", "\t", "\U0001F600", "\ufffd"}
    assert all(any(s in texts[h] for h in seen) for s in special)


def test_manifest_records_the_contract(make_shards, tmp_path, tokenizer_path):
    out = tmp_path / "ds"
    make_shards(out)
    raw = json.loads((out / "manifest.json").read_text())
    for key in ("seq_len", "vocab_size", "dtype", "bos_id", "eos_id", "pad_id", "unk_id", "tokenizer",
                "windows_per_shard", "sample_bytes", "splits", "corpus", "job"):
        assert key in raw
    assert (raw["seq_len"], raw["vocab_size"], raw["dtype"], raw["bos_id"], raw["eos_id"]) == (SEQ_LEN, 400, "uint16", 1, 2)
    assert (out / raw["tokenizer"]["path"]).read_bytes() == open(tokenizer_path, "rb").read()
    m = Manifest.load(str(out / "manifest.json"))
    for name in SPLITS:
        shards = m.split(name).shards
        assert [s.path for s in shards] == [f"{name}/shard-{k:06d}.tar" for k in range(len(shards))]
        assert all(s.windows == WINDOWS_PER_SHARD for s in shards[:-1]) and 0 < shards[-1].windows <= WINDOWS_PER_SHARD
        for s in shards:
            assert (out / s.path).stat().st_size == s.bytes
    assert not list(out.rglob("*.tmp"))


def test_same_seed_same_bytes_other_seed_other_order(make_shards, tmp_path):
    make_shards(tmp_path / "a")
    make_shards(tmp_path / "b")
    assert read_tree(str(tmp_path / "a")) == read_tree(str(tmp_path / "b"))
    make_shards(tmp_path / "c", seed=1)
    for name in SPLITS:
        a = (tmp_path / "a" / name / "documents.jsonl").read_text().splitlines()
        c = (tmp_path / "c" / name / "documents.jsonl").read_text().splitlines()
        assert sorted(a) == sorted(c), "a document's split does not depend on the seed"
    assert a != c


def test_one_and_three_workers_write_identical_datasets(make_shards, tmp_path, monkeypatch):
    # small batches, so that several are in flight at once and the order of results matters
    monkeypatch.setattr(shards_module, "_BATCH_CHARS", 2048)
    monkeypatch.setattr(shards_module, "_MIN_BATCH_CHARS", 512)
    submitted = []
    batches = shards_module.document_batches

    def counting(docs, workers=1):
        for batch in batches(docs, workers):
            submitted.append(workers)
            yield batch

    monkeypatch.setattr(shards_module, "document_batches", counting)
    make_shards(tmp_path / "one", workers=1)
    make_shards(tmp_path / "three", workers=3)
    assert submitted.count(3) > 4 * 3  # more batches than the 2 per worker kept in flight
    assert read_tree(str(tmp_path / "one")) == read_tree(str(tmp_path / "three"))


def _die(texts):
    os._exit(3)  # a worker killed from outside (the OOM killer) looks the same to the job


@pytest.mark.timeout(120)
def test_a_dead_worker_is_an_error_not_a_hang(make_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "_encode_batch", _die)
    with pytest.raises(DataPrepError, match="worker process died"):
        make_shards(tmp_path / "out", workers=2)


def test_rerun_repairs_corrupt_shard_and_removes_partial_temp_file(make_shards, tmp_path):
    ref = tmp_path / "ref"
    make_shards(ref)
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "manifest.json").unlink()
    shard = out / "train" / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    (out / "train" / "shard-000003.tar.tmp").write_bytes(b"half a shard")
    summary = make_shards(out)
    assert summary["splits"]["train"]["kept_shards"] == 2
    assert summary["splits"]["val"]["kept_shards"] == summary["splits"]["val"]["shards"]
    assert read_tree(str(out)) == read_tree(str(ref))


def test_resume_from_journal_that_lags_the_renamed_shards(make_shards, tmp_path):
    """A kill between a shard's rename and the journal update: the shard is redone identically."""
    ref = tmp_path / "ref"
    make_shards(ref)
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "manifest.json").unlink()
    journal = json.loads((out / PROGRESS_NAME).read_text())
    train = journal["train"]
    train["shards"], train["starts"], train["finished"] = train["shards"][:3], train["starts"][:4], None
    (out / PROGRESS_NAME).write_text(json.dumps(journal))
    summary = make_shards(out)
    assert summary["splits"]["train"]["kept_shards"] == 3
    assert 0 < summary["tokens_encoded"] < summary["splits"]["train"]["tokens"], "resumed mid-stream"
    assert read_tree(str(out)) == read_tree(str(ref))


def test_rerun_of_a_finished_dataset_keeps_everything(make_shards, tmp_path):
    out = tmp_path / "ds"
    first = make_shards(out)
    before = read_tree(str(out))
    again = make_shards(out)
    assert again["tokens_encoded"] == 0
    for name in SPLITS:
        assert again["splits"][name]["kept_shards"] == first["splits"][name]["shards"]
    assert read_tree(str(out)) == before
