"""The shards job: round trip to the documents, determinism (seed, workers, tasks in any order or process),
re-runs that keep finished tasks and rewrite the others, and a merge that names a missing task."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data_prep.shards as shards_module
from data_prep import DataPrepError
from data_prep.corpus import CorpusConfig
from data_prep.shards import ShardsConfig, merge, parse_task_range, write_shards
from prep_helpers import SEQ_LEN, WINDOWS_PER_SHARD, corpus_files, expected_documents, read_tree
from zarvan_dist.config import ConfigError
from zarvan_dist.data import SPLITS, Manifest, WindowReader
from zarvan_dist.tokenizer import encode_documents, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _decode_documents(sp, stream: np.ndarray, bos: int) -> list[str]:
    """Texts of a token stream cut at each BOS (the stream starts with one)."""
    starts = np.flatnonzero(stream == bos)
    assert starts[0] == 0
    return [sp.decode(seg[1:].tolist()) for seg in np.split(stream, starts[1:])]


def _check_round_trip(out: Path, sp, texts: dict[str, str], summary: dict) -> None:
    """Each task's stream of each split is exactly the encoding of the documents it lists, its windows the
    head and its tail the rest; those starting in a tail are counted; every document is met once."""
    reader = WindowReader(str(out))
    m = reader.manifest
    assert summary["corpus"].documents == len(texts)
    seen, tail_documents = [], 0
    for name in SPLITS:
        entry = m.split(name)
        windows = list(reader.iter_windows(name))
        assert len(windows) == entry.windows > 0
        assert all(w.shape == (SEQ_LEN + 1,) and w.dtype == np.uint16 for w in windows)
        tails = 0
        for t in range(m.tasks):  # each task's stream: its windows, its documents list, its tail
            record = json.loads((out / "tasks" / f"{t:05d}" / "task.json").read_text())[name]
            order = [json.loads(line)["sha256"] for line in (out / record["documents_path"]).read_text().splitlines()]
            seen += order
            docs = [texts[h] for h in order]
            mine = [i for i, s in enumerate(entry.shards) if s.task == t]
            first = m.first_window(name, mine[0]) if mine else 0
            own = windows[first:first + record["windows"]]
            for i in range(1, len(own)):
                assert own[i][0] == own[i - 1][-1], "consecutive windows of a task share one token"
            # the list: the documents whose BOS is written; those starting in the tail are only counted
            full, lengths = encode_documents(sp, docs, m.dtype) if docs else (np.zeros(0, m.dtype), np.zeros(0, int))
            assert len(full) <= record["tokens"] and (record["tail_documents"] == 0) == (len(full) == record["tokens"])
            tail_documents += record["tail_documents"]
            if own:
                stream = np.concatenate([own[0]] + [w[1:] for w in own[1:]])
                assert len(stream) == record["windows"] * SEQ_LEN + 1 == record["tokens"] - record["tail_tokens"]
                np.testing.assert_array_equal(stream, full[:len(stream)])
                assert lengths[:-1].sum() < len(stream), "the last listed document's BOS is written"
                assert 0 <= record["tail_tokens"] < SEQ_LEN
                # Every document that ends inside the windows comes back from the windows alone.
                from_windows = _decode_documents(sp, stream, m.bos_id)
                assert from_windows[:-1] == docs[:len(from_windows) - 1]
            if len(full):
                assert _decode_documents(sp, full, m.bos_id) == docs
            tails += record["tail_tokens"]
        assert entry.tail_tokens == tails == summary["splits"][name]["tail_tokens"]
    assert len(seen) + tail_documents == len(texts) and set(seen) <= set(texts)
    assert tail_documents == sum(m.split(name).tail_documents for name in SPLITS)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_round_trip_gives_back_every_document(make_shards, tmp_path, tokenizer_path, num_tasks):
    out = tmp_path / "ds"
    summary = make_shards(out, num_tasks=num_tasks)
    assert (Manifest.load(str(out)).version, Manifest.load(str(out)).tasks) == (2, num_tasks)
    texts = expected_documents(corpus_files())
    _check_round_trip(out, load_tokenizer(tokenizer_path).processor, texts, summary)
    assert summary["corpus"].undecodable_documents == 2  # invalid.txt and the lone surrogate
    special = {"\u2581", "\r\n", "\t", "\U0001F600", "\ufffd"}
    assert all(any(s in text for text in texts.values()) for s in special)


def test_manifest_records_the_contract(make_shards, tmp_path, tokenizer_path):
    out = tmp_path / "ds"
    make_shards(out, num_tasks=2)
    raw = json.loads((out / "manifest.json").read_text())
    for key in ("version", "tasks", "seq_len", "vocab_size", "dtype", "bos_id", "eos_id", "pad_id", "unk_id",
                "tokenizer", "windows_per_shard", "sample_bytes", "splits", "corpus", "job"):
        assert key in raw
    assert (raw["version"], raw["tasks"], raw["seq_len"], raw["vocab_size"], raw["dtype"], raw["bos_id"]) == \
        (2, 2, SEQ_LEN, 400, "uint16", 1)
    assert (out / raw["tokenizer"]["path"]).read_bytes() == open(tokenizer_path, "rb").read()
    m = Manifest.load(str(out / "manifest.json"))
    for name in SPLITS:
        shards = m.split(name).shards
        for t in (0, 1):
            mine = [s for s in shards if s.task == t]
            assert [s.path for s in mine] == [f"tasks/{t:05d}/{name}/shard-{k:06d}.tar" for k in range(len(mine))]
            assert [s.first_key for s in mine] == [k * WINDOWS_PER_SHARD for k in range(len(mine))]
            assert all(s.windows == WINDOWS_PER_SHARD for s in mine[:-1]) and 0 < mine[-1].windows <= WINDOWS_PER_SHARD
        assert [s.task for s in shards] == sorted(s.task for s in shards), "tasks in order"
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
    submitted = []
    batches = shards_module.document_batches

    def counting(stream):
        for batch in batches(stream):
            submitted.append(batch[0])
            yield batch

    monkeypatch.setattr(shards_module, "document_batches", counting)
    make_shards(tmp_path / "one", workers=1, num_tasks=2)
    make_shards(tmp_path / "three", workers=3, num_tasks=2)
    assert len(submitted) > 2 * 4 * 3  # more batches than the 2 per worker kept in flight
    assert read_tree(str(tmp_path / "one")) == read_tree(str(tmp_path / "three"))


def _config(tokenizer_path: str, corpus_dir: Path, out: Path, **overrides) -> ShardsConfig:
    fields = dict(tokenizer=tokenizer_path, out=str(out), seq_len=SEQ_LEN, val_fraction=0.1,
                  windows_per_shard=WINDOWS_PER_SHARD, num_tasks=4, corpus=CorpusConfig(inputs=[str(corpus_dir)]))
    return ShardsConfig(**{**fields, **overrides})


def _command(tokenizer_path: str, corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep", "shards", "--input", str(corpus_dir), "--tokenizer", tokenizer_path,
            "--out", str(out), "--seq-len", str(SEQ_LEN), "--val-fraction", "0.1", "--windows-per-shard",
            str(WINDOWS_PER_SHARD), "--num-tasks", "4", "--quiet", *extra]


def test_tasks_in_any_order_or_process_give_the_same_bytes(tokenizer_path, corpus_dir, tmp_path):
    """One run; the tasks in reverse order; two processes standing in for two machines (each a range of
    tasks into the same output, at the same time), then the merge: the same bytes."""
    write_shards(_config(tokenizer_path, corpus_dir, tmp_path / "one"), progress=False)
    reverse = _config(tokenizer_path, corpus_dir, tmp_path / "reverse")
    for t in (3, 2, 1, 0):
        assert write_shards(reverse, range(t, t + 1), progress=False)["tasks"] == {t: "written"}
    merge(str(tmp_path / "reverse"))
    assert read_tree(str(tmp_path / "reverse")) == read_tree(str(tmp_path / "one"))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [subprocess.Popen(_command(tokenizer_path, corpus_dir, tmp_path / "two", "--tasks", tasks, "--workers",
                                          "2"), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for tasks in ("2-3", "0-1")]
    for proc in machines:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    assert not (tmp_path / "two" / "manifest.json").exists(), "a range of tasks does not merge"
    done = subprocess.run([sys.executable, "-m", "data_prep", "merge", "--out", str(tmp_path / "two")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_tree(str(tmp_path / "two")) == read_tree(str(tmp_path / "one"))


def test_the_merge_names_the_tasks_that_have_not_finished(tokenizer_path, corpus_dir, tmp_path, capsys):
    cfg = _config(tokenizer_path, corpus_dir, tmp_path / "ds")
    write_shards(cfg, range(0, 2), progress=False)
    write_shards(cfg, range(3, 4), progress=False)
    with pytest.raises(DataPrepError, match=r"1 of the 4 tasks have not finished .*: task 2; run them"):
        merge(str(tmp_path / "ds"))
    from data_prep.__main__ import main
    assert main(["merge", "--out", str(tmp_path / "ds")]) == 1
    assert "task 2" in capsys.readouterr().err
    assert not (tmp_path / "ds" / "manifest.json").exists()
    with pytest.raises(DataPrepError, match="no finished task"):
        merge(str(tmp_path / "empty"))


def test_task_ranges_parse_and_are_checked():
    assert parse_task_range("3", 8) == range(3, 4)
    assert parse_task_range("0-7", 8) == range(0, 8)
    for bad in ("8", "3-2", "a-b", "-1", "2-9"):
        with pytest.raises(ConfigError, match="tasks: "):
            parse_task_range(bad, 8)


def _die(texts):
    os._exit(3)  # a worker killed from outside (the OOM killer) looks the same to the job


@pytest.mark.timeout(120)
def test_a_dead_worker_is_an_error_not_a_hang(make_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "_encode_batch", _die)
    with pytest.raises(DataPrepError, match="worker process died"):
        make_shards(tmp_path / "out", workers=2)


def test_a_rerun_rewrites_a_damaged_or_unfinished_task_and_keeps_the_rest(make_shards, tmp_path):
    ref = tmp_path / "ref"
    make_shards(ref, num_tasks=3)
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "manifest.json").unlink()
    shard = out / "tasks" / "00001" / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    # task 2 as a kill leaves it: no task.json, a partial file
    (out / "tasks" / "00002" / "task.json").unlink()
    (out / "tasks" / "00002" / "train" / "shard-000009.tar.tmp").write_bytes(b"half a shard")
    summary = make_shards(out, num_tasks=3)
    assert summary["tasks"] == {0: "kept", 1: "written", 2: "written"}
    assert read_tree(str(out)) == read_tree(str(ref))


def test_rerun_of_a_finished_dataset_keeps_everything(make_shards, tmp_path):
    out = tmp_path / "ds"
    make_shards(out, num_tasks=2)
    before = read_tree(str(out))
    again = make_shards(out, num_tasks=2)
    assert again["tokens_encoded"] == 0 and again["tasks"] == {0: "kept", 1: "kept"}
    assert read_tree(str(out)) == before


def test_another_configuration_is_refused_unless_overwrite(make_shards, tmp_path):
    out = tmp_path / "ds"
    make_shards(out)
    with pytest.raises(DataPrepError, match=r"manifest.json was written by another configuration \(differs in: "
                                            r"num_tasks.*pass --overwrite"):
        make_shards(out, num_tasks=2)
    make_shards(out, num_tasks=2, overwrite=True)
    assert Manifest.load(str(out)).tasks == 2
    assert not (out / "tasks" / "00002").exists()


def test_parquet_zstd_gzip_and_text_inputs_round_trip_through_the_job(make_shards, tmp_path, tokenizer_path):
    """Every document of a corpus in every input format comes back exactly from the dataset: its windows,
    and the tail for the documents that start there (two tasks, pieces of a few KiB)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = list(expected_documents(corpus_files()).values())
    quarter = len(texts) // 4
    parts = [texts[:quarter], texts[quarter:2 * quarter], texts[2 * quarter:3 * quarter], texts[3 * quarter:]]
    lines = ["".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(p)).encode() for p in parts[:3]]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.jsonl").write_bytes(lines[0])
    (inputs / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[1]))
    (inputs / "c.jsonl.gz").write_bytes(gzip.compress(lines[2]))
    pq.write_table(pa.table({"id": list(range(len(parts[3]))), "text": parts[3]}), inputs / "d.parquet",
                   row_group_size=5)
    out = tmp_path / "ds"
    summary = make_shards(out, inputs=[str(inputs)], num_tasks=2, piece_bytes=4096)
    _check_round_trip(out, load_tokenizer(tokenizer_path).processor,
                      {hashlib.sha256(t.encode()).hexdigest(): t for t in texts}, summary)
