"""Lane continuity: over many steps, across shard boundaries and across a resume, the tokens fed to
each row are exactly its lane's contiguous stream, each window once."""

from __future__ import annotations

import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.train import Trainer
from run_helpers import ROOT, run_config, trainer_env
from zarvan_dist.data import Manifest
from zarvan_dist.data.lanes import LaneLayout
from zarvan_dist.data.loader import LaneBatch, LaneLoader
from zarvan_dist.data.reader import WindowReader
from zarvan_dist.training.config import load_run_config

WINDOWS_PER_SHARD = 10  # the token_dataset fixture's shards


def expected_window(layout: LaneLayout, step: int, row: int) -> tuple[int, bool]:
    """Row ``row``'s window at micro-step ``step``, stated from DESIGN.md, and whether its state resets."""
    lane = layout.num_windows // layout.rows
    epoch, k = divmod(step, lane)
    window = (layout.epoch_offset(epoch) + row * lane + k) % layout.num_windows
    # the stream is contiguous unless the lane starts here or wraps from window N-1 to 0
    return window, k == 0 or window == 0


def take(url: Path, layout: LaneLayout, steps: int, **kw) -> list[LaneBatch]:
    batches = iter(LaneLoader(str(url), "train", layout, **kw))
    try:
        return list(islice(batches, steps))
    finally:
        batches.close()


@pytest.fixture(scope="module")
def reader(token_dataset) -> WindowReader:
    return WindowReader(str(token_dataset))


@pytest.fixture(scope="module")
def all_windows(reader) -> np.ndarray:
    """[N, seq_len + 1] every train window, each read on its own (random access)."""
    n = reader.manifest.split("train").windows
    return np.stack([reader.read("train", w) for w in range(n)]).astype(np.int64)


@pytest.mark.parametrize("rotation_seed", [None, 3])
def test_rows_stream_their_lanes_in_order_over_epochs_and_shards_with_and_without_workers(
        token_dataset, all_windows, rotation_seed):
    n = len(all_windows)
    layout = LaneLayout(n, 4, rotation_seed)
    lane = layout.lane_len
    steps = 2 * lane + 7  # two whole epochs and part of a third
    serial = take(token_dataset, layout, steps, workers=0)
    parallel = take(token_dataset, layout, steps, workers=2, prefetch=3)

    crossed_shard = 0
    previous: dict[int, np.ndarray] = {}
    seen_in_epoch: set[int] = set()
    for s, (a, b) in enumerate(zip(serial, parallel, strict=True)):
        for field in ("rows", "windows", "tokens", "reset"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (s, field)
        assert a.step == b.step == s
        assert a.rows.tolist() == [0, 1, 2, 3]
        assert a.tokens.dtype == torch.int64 and a.tokens.shape == (4, all_windows.shape[1])
        if s % lane == 0:
            seen_in_epoch = set()
        for j in range(4):
            window, reset = expected_window(layout, s, j)
            assert int(a.windows[j]) == window, (s, j)
            assert bool(a.reset[j]) == reset, (s, j)
            tokens = a.tokens[j].numpy()
            np.testing.assert_array_equal(tokens, all_windows[window])
            assert window not in seen_in_epoch, f"window {window} twice in one epoch"
            seen_in_epoch.add(window)
            if not reset:
                # the stream chains: this window starts with the last token of the row's previous one
                assert tokens[0] == previous[j][-1], (s, j)
                crossed_shard += window % WINDOWS_PER_SHARD == 0
            previous[j] = tokens
    assert crossed_shard >= 4 * 2  # each lane crossed shard boundaries without a reset
    if rotation_seed is not None:
        assert {layout.epoch_offset(e) for e in (1, 2)} != {0}
    assert len(seen_in_epoch) == 4 * (steps - 2 * lane)


def test_a_loader_started_at_step_s_gives_exactly_the_later_batches(token_dataset):
    n = Manifest.load(str(token_dataset)).split("train").windows
    layout = LaneLayout(n, 4, rotation_seed=5)
    lane = layout.lane_len
    full = take(token_dataset, layout, 2 * lane + 4)
    # starts mid-shard, at a shard edge, at the last step of an epoch, at an epoch start, mid-epoch 2
    starts = [3, WINDOWS_PER_SHARD, lane - 1, lane, lane + 13, 2 * lane]
    for start in starts:
        for workers in (0, 2):
            resumed = take(token_dataset, layout, 4, start=start, workers=workers)
            for a, b in zip(full[start:start + 4], resumed, strict=True):
                assert a.step == b.step
                for field in ("rows", "windows", "tokens", "reset"):
                    assert torch.equal(getattr(a, field), getattr(b, field)), (start, workers, field)
            # the first batch of a resumed loader is read at its window's offset, not from the shard's start
            assert resumed[0].step == start


def test_a_ranks_rows_are_the_same_rows_of_the_full_batch(token_dataset):
    n = Manifest.load(str(token_dataset)).split("train").windows
    layout = LaneLayout(n, 8, rotation_seed=1)
    steps = layout.lane_len + 3
    full = take(token_dataset, layout, steps)
    for world in (2, 4):
        for rank in range(world):
            rows = layout.rank_rows(rank, world)
            part = take(token_dataset, layout, steps, rows=rows, workers=2 if rank == 0 else 0)
            for a, b in zip(full, part, strict=True):
                assert b.rows.tolist() == list(rows)
                for field in ("windows", "tokens", "reset"):
                    assert torch.equal(getattr(a, field)[rows.start:rows.stop], getattr(b, field)), (world, rank)


# ---- the trainer feeds each row its lane, across a checkpoint and a resume


def _recording(monkeypatch) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Record (micro-step, windows, tokens) of every training micro-step that Trainer.forward_window sees."""
    seen: list[tuple[int, np.ndarray, np.ndarray]] = []
    original = Trainer.forward_window

    def forward_window(self, batch, state):
        if self.model.training:  # not the evaluation's val batches
            seen.append((batch.step, batch.windows.numpy().copy(), batch.tokens.numpy().copy()))
        return original(self, batch, state)

    monkeypatch.setattr(Trainer, "forward_window", forward_window)
    return seen


def test_the_trainer_feeds_each_row_its_lane_once_across_a_resume(token_dataset, all_windows, tmp_path, monkeypatch):
    rows, accum, steps, stop = 16, 2, 13, 7
    sections = dict(data={"rows": rows, "workers": 0}, train={"steps": steps, "grad_accum": accum},
                    checkpoint={"every": stop, "keep": 2}, eval={"every": 0, "rows": 2, "steps": 1},
                    logging={"every": 5, "tensorboard": False, "progress": False})
    seen = _recording(monkeypatch)
    (tmp_path / "a").mkdir()
    Trainer(load_run_config(run_config(tmp_path / "a", token_dataset, **sections))).fit()
    straight = list(seen)
    seen.clear()

    (tmp_path / "b").mkdir()
    config = run_config(tmp_path / "b", token_dataset, **sections)
    Trainer(load_run_config(config, [f"train.steps={stop}"])).fit()  # stops at the checkpoint of step 7
    first = len(seen)
    assert first == stop * accum
    # the second run resumes from that checkpoint, with DataLoader workers this time
    Trainer(load_run_config(config, ["data.workers=2"])).fit()
    resumed = list(seen)

    cfg = load_run_config(config)
    layout = LaneLayout(len(all_windows), rows, cfg.data.rotation_seed)
    assert steps * accum > layout.lane_len  # the run crosses an epoch (and its rotation)
    assert [s for s, _, _ in resumed] == list(range(steps * accum))  # no micro-step replayed or skipped
    for (sa, wa, ta), (sb, wb, tb) in zip(straight, resumed, strict=True):
        assert sa == sb and np.array_equal(wa, wb) and np.array_equal(ta, tb)
    for j in range(rows):
        got = [int(w[j]) for _, w, _ in resumed]
        assert got == [expected_window(layout, s, j)[0] for s in range(steps * accum)], j
        lane = layout.lane_len
        for epoch in range(0, steps * accum, lane):
            part = got[epoch:epoch + lane]
            assert len(set(part)) == len(part)  # each window once per epoch
        for s, (_, w, t) in enumerate(resumed):
            np.testing.assert_array_equal(t[j], all_windows[int(w[j])])
            if s and not expected_window(layout, s, j)[1]:
                assert t[j][0] == resumed[s - 1][2][j][-1]  # chained through the checkpoint at micro-step 14


def test_workers_deliver_under_a_tmpdir_too_long_for_a_unix_socket(token_dataset, tmp_path):
    # Tensors sent from a DataLoader worker go through a Unix socket under TMPDIR, whose path is limited
    # to 107 bytes; the loader sends numpy arrays by value, so a long TMPDIR cannot stall the workers.
    tmp = tmp_path / ("t" * 60) / ("m" * 60)
    tmp.mkdir(parents=True)
    code = ("import sys; from zarvan_dist.data import LaneLayout, Manifest; "
            "from zarvan_dist.data.loader import LaneLoader; "
            "m = Manifest.load(sys.argv[1]); layout = LaneLayout(m.split('train').windows, 4); "
            "it = iter(LaneLoader(sys.argv[1], 'train', layout, workers=2)); "
            "print([int(next(it).step) for _ in range(3)]); it.close()")
    done = subprocess.run([sys.executable, "-c", code, str(token_dataset)], cwd=ROOT, capture_output=True, text=True,
                          env={**trainer_env(tmp_path), "TMPDIR": str(tmp)}, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[0, 1, 2]"
