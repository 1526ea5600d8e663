"""Neighbour sidecars: the reader gives back what was written, refuses another dataset's sidecar, and
the lane loader hands every row the neighbours of exactly the window it hands it tokens for. The
streaming errors of the sidecar reader and the token reader (one shared shard stream) name the file."""

from __future__ import annotations

import re
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.pretrain.token_data import random_documents, write_neighbour_sidecar, write_token_dataset
from zarvan_dist.config import ConfigError
from zarvan_dist.data import DatasetError, LaneLayout, NeighbourReader, WindowReader
from zarvan_dist.data.loader import LaneBatch, LaneLoader

SEQ_LEN, VOCAB, WINDOWS_PER_SHARD = 16, 64, 10
CHUNK, K, NEIGHBOUR_LEN = 5, 3, 6  # C does not divide seq_len: the last chunk of a window is shorter
ROWS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(token dataset, its sidecar, split -> (ids [N, n, K, L], distances [N, n, K]) written)."""
    root = tmp_path_factory.mktemp("neighbours")
    rng = np.random.default_rng(0)
    tokens = root / "tokens"
    write_token_dataset(tokens, {"train": random_documents(rng, 30, VOCAB, 20, 160),
                                 "val": random_documents(rng, 6, VOCAB, 20, 100)}, SEQ_LEN, VOCAB, WINDOWS_PER_SHARD)
    sidecar = tokens / "retrieval" / "neighbours"
    return tokens, sidecar, write_neighbour_sidecar(sidecar, tokens, CHUNK, K, NEIGHBOUR_LEN)


def test_read_and_iter_windows_give_what_was_written(dataset):
    tokens, sidecar, written = dataset
    reader = NeighbourReader(str(sidecar), dataset=str(tokens))
    assert reader.ids_shape == (-(-SEQ_LEN // CHUNK), K, NEIGHBOUR_LEN) == (4, K, NEIGHBOUR_LEN)
    for split, (ids, distances) in written.items():
        n = len(ids)
        assert n > 2 * WINDOWS_PER_SHARD, split
        for window in range(n):
            got_ids, got_dist = reader.read(split, window)
            np.testing.assert_array_equal(got_ids, ids[window])
            np.testing.assert_array_equal(got_dist, distances[window])
        # from the start, from the middle of a shard (a seek), from a shard edge, the last window
        for start in (0, 3, WINDOWS_PER_SHARD + 7, 2 * WINDOWS_PER_SHARD, n - 1):
            streamed = list(reader.iter_windows(split, start))
            assert len(streamed) == n - start, (split, start)
            np.testing.assert_array_equal(np.stack([i for i, _ in streamed]), ids[start:])
            np.testing.assert_array_equal(np.stack([d for _, d in streamed]), distances[start:])
        assert list(reader.iter_windows(split, n)) == []


def test_a_sidecar_of_another_dataset_is_refused_naming_both(dataset, tmp_path):
    tokens, sidecar, _ = dataset
    other = tmp_path / "other"
    rng = np.random.default_rng(1)
    write_token_dataset(other, {"train": random_documents(rng, 30, VOCAB, 20, 160),
                                "val": random_documents(rng, 6, VOCAB, 20, 100)}, SEQ_LEN, VOCAB, WINDOWS_PER_SHARD)
    for refuse in (lambda: NeighbourReader(str(sidecar), dataset=str(other)),
                   lambda: LaneLoader(str(other), "train", LaneLayout(ROWS, ROWS), neighbours=str(sidecar))):
        with pytest.raises(ConfigError) as caught:
            refuse()
        assert str(sidecar) in str(caught.value) and str(other) in str(caught.value)


@pytest.mark.parametrize("kind", ["tokens", "neighbours"])
def test_streaming_errors_name_the_shard_window_and_listing(dataset, tmp_path, kind):
    tokens, sidecar, written = dataset
    copy = tmp_path / "tokens"
    shutil.copytree(tokens, copy)
    if kind == "tokens":
        shards, listing, label = copy / "train", "manifest", "split train"
        reader = WindowReader(str(copy))
        stride = reader.manifest.sample_bytes
    else:
        shards, listing = copy / sidecar.relative_to(tokens) / "train", "neighbour manifest"
        reader = NeighbourReader(str(copy / sidecar.relative_to(tokens)))
        label, stride = f"{reader.root}: split train", reader.manifest.sample_bytes
    n = len(written["train"][0])
    last = shards / f"shard-{(n - 1) // WINDOWS_PER_SHARD:06d}.tar"
    original = {p: p.read_bytes() for p in (shards / "shard-000000.tar", shards / "shard-000001.tar", last)}

    def fails(start: int, pattern: str) -> None:
        with pytest.raises(DatasetError, match=pattern):
            list(reader.iter_windows("train", start))
        for path, data in original.items():
            path.write_bytes(data)

    (shards / "shard-000001.tar").unlink()
    fails(3, rf"{re.escape(str(shards))}/shard-000001\.tar: shard listed in the {listing} is missing")
    (shards / "shard-000000.tar").write_bytes(original[shards / "shard-000001.tar"])
    fails(3, r"shard-000000\.tar sample (00000-)?000000000013: expected window 3 \(key (00000-)?000000000003\) with field")
    # cut inside window 12's first payload: the error comes while window 11's sample is still open
    (shards / "shard-000001.tar").write_bytes(original[shards / "shard-000001.tar"][:2 * stride + 512 + 50])
    fails(WINDOWS_PER_SHARD + 1, rf"{re.escape(label)}, reading window {WINDOWS_PER_SHARD + 1}: .*shard-000001\.tar")
    last.write_bytes(original[last][:(n - 1) % WINDOWS_PER_SHARD * stride])  # its last sample gone
    fails(WINDOWS_PER_SHARD, rf"{re.escape(label)}: shards held {n - WINDOWS_PER_SHARD - 1} windows from window "
                             rf"{WINDOWS_PER_SHARD}, the {listing} says {n - WINDOWS_PER_SHARD}")
    assert len(list(reader.iter_windows("train", WINDOWS_PER_SHARD))) == n - WINDOWS_PER_SHARD


def _take(tokens: Path, layout: LaneLayout, steps: int, **kw) -> list[LaneBatch]:
    batches = iter(LaneLoader(str(tokens), "train", layout, **kw))
    try:
        return list(islice(batches, steps))
    finally:
        batches.close()


def _check_batches(batches: list[LaneBatch], first_step: int, layout: LaneLayout, windows: np.ndarray,
                   ids: np.ndarray) -> None:
    """Every row of every batch holds the tokens and the neighbours of the window the layout gives it."""
    for s, batch in enumerate(batches, first_step):
        assert batch.step == s
        want, _ = layout.windows(s)
        np.testing.assert_array_equal(batch.windows.numpy(), want)
        assert batch.neighbours.dtype == torch.int64 and batch.neighbours.shape == (ROWS, *ids.shape[1:])
        for j in range(ROWS):
            np.testing.assert_array_equal(batch.tokens[j].numpy(), windows[want[j]], err_msg=f"step {s} row {j}")
            np.testing.assert_array_equal(batch.neighbours[j].numpy(), ids[want[j]], err_msg=f"step {s} row {j}")


@pytest.mark.parametrize("workers", [0, 2])
def test_the_lane_loader_delivers_each_windows_neighbours_with_its_tokens(dataset, workers):
    tokens, sidecar, written = dataset
    ids = written["train"][0]
    reader = WindowReader(str(tokens))
    windows = np.stack([reader.read("train", w) for w in range(len(ids))])
    layout = LaneLayout(len(ids), ROWS, rotation_seed=3)
    lane = layout.lane_len
    steps = 2 * lane + 5  # two epochs (the second rotated, so a lane wraps from the last window to 0) and more
    assert {layout.epoch_offset(e) for e in (1, 2)} != {0}
    full = _take(tokens, layout, steps, workers=workers, neighbours=str(sidecar))
    _check_batches(full, 0, layout, windows, ids)
    # started later (mid-shard, at a shard edge, mid-epoch 1), every row's streams open at its window
    for start in (3, WINDOWS_PER_SHARD, lane + 13):
        later = _take(tokens, layout, 4, start=start, workers=workers, neighbours=str(sidecar))
        _check_batches(later, start, layout, windows, ids)
    assert _take(tokens, layout, 1, workers=workers)[0].neighbours is None  # no sidecar: no neighbours
