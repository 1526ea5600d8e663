"""Inputs and outputs through fsspec: memory:// and file:// URLs, read back with webdataset."""

from __future__ import annotations

import numpy as np

from data_prep.verify import verify_dataset
from prep_helpers import corpus_files, read_tree, write_files
from zarvan_dist.data import SPLITS, WindowReader


def _shards(tree: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in tree.items() if k.endswith(".tar")}


def _check_reader(url: str) -> None:
    """Streaming with webdataset and ranged reads give the same windows for every split."""
    reader = WindowReader(url)
    for name in SPLITS:
        streamed = list(reader.iter_windows(name))
        assert len(streamed) == reader.manifest.split(name).windows
        for i in (0, len(streamed) // 2, len(streamed) - 1):
            np.testing.assert_array_equal(reader.read(name, i), streamed[i])
        start = len(streamed) - 20
        tail = list(reader.iter_windows(name, start=start))
        assert len(tail) == 20 and all(np.array_equal(a, b) for a, b in zip(tail, streamed[start:]))


def test_memory_input_and_output(make_shards, memory_root, tmp_path):
    write_files(f"{memory_root}/corpus", corpus_files())
    out = f"{memory_root}/ds"
    summary = make_shards(out, inputs=[f"{memory_root}/corpus"])
    assert summary["corpus"].documents > 0
    tree = read_tree(out)
    assert "manifest.json" in tree and not any(k.endswith(".tmp") for k in tree)
    # Same documents in the same input order: the same shards as from a local folder.
    local = tmp_path / "local"
    write_files(str(tmp_path / "corpus"), corpus_files())
    make_shards(local, inputs=[str(tmp_path / "corpus")])
    assert _shards(tree) == _shards(read_tree(str(local)))
    verify_dataset(out, progress=False)
    _check_reader(out)


def test_memory_glob_input(make_shards, memory_root):
    write_files(f"{memory_root}/corpus", corpus_files())
    summary = make_shards(f"{memory_root}/ds", inputs=[f"{memory_root}/corpus/prose/*.txt"], val_fraction=0.0)
    assert summary["corpus"].documents == 40
    assert summary["splits"]["val"]["documents"] == 0 and summary["splits"]["val"]["shards"] == 0


def test_file_urls_in_and_out(make_shards, corpus_dir, tmp_path):
    plain = tmp_path / "plain"
    make_shards(plain)
    url = f"file://{tmp_path}/url"
    make_shards(url, inputs=[f"file://{corpus_dir}"])
    tree = read_tree(url)
    assert _shards(tree) == _shards(read_tree(str(plain)))
    for name in SPLITS:
        key = f"{name}/documents.jsonl"
        assert tree[key] == (plain / key).read_bytes(), "sources are the same file:// URLs"
    verify_dataset(url, progress=False)
    _check_reader(url)
