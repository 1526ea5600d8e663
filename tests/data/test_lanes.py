"""LaneLayout: every row reads its lane in order, ranks split the rows, the step is the cursor."""

from __future__ import annotations

import numpy as np
import pytest

from zarvan_dist.data.lanes import LaneLayout


def stream_of_row(layout: LaneLayout, row: int, steps: int) -> tuple[list[int], list[bool]]:
    got = [layout.windows(s, range(row, row + 1)) for s in range(steps)]
    return [int(w[0]) for w, _ in got], [bool(r[0]) for _, r in got]


def test_each_row_reads_its_lane_contiguously_and_each_window_once_per_epoch():
    layout = LaneLayout(num_windows=103, rows=8)
    lane = layout.lane_len
    assert lane == 12
    seen = []
    for row in range(8):
        windows, reset = stream_of_row(layout, row, 2 * lane)
        assert windows[:lane] == list(range(row * lane, (row + 1) * lane))
        assert windows[lane:] == windows[:lane]  # epoch 1 without rotation repeats epoch 0
        assert reset == ([True] + [False] * (lane - 1)) * 2
        seen += windows[:lane]
    assert sorted(seen) == list(range(8 * lane))  # every window at most once; 7 windows unread


def test_rotation_moves_lanes_per_epoch_and_resets_at_the_wrap():
    layout = LaneLayout(num_windows=50, rows=4, rotation_seed=7)
    lane = layout.lane_len
    offsets = {layout.epoch_offset(e) for e in range(1, 8)}
    assert layout.epoch_offset(0) == 0 and len(offsets) > 1
    assert layout.epoch_offset(3) == LaneLayout(50, 4, rotation_seed=7).epoch_offset(3)  # seeded
    for epoch in range(1, 8):
        per_epoch = []
        for row in range(4):
            windows, reset = stream_of_row(layout, row, (epoch + 1) * lane)
            windows, reset = windows[epoch * lane:], reset[epoch * lane:]
            per_epoch += windows
            for k in range(1, lane):
                contiguous = windows[k] == windows[k - 1] + 1
                assert reset[k] == (not contiguous), (epoch, row, k)
                assert contiguous or (windows[k - 1] == 49 and windows[k] == 0)
            assert reset[0]
        assert len(set(per_epoch)) == len(per_epoch)  # no window twice within an epoch


def test_ranks_split_rows_and_cover_each_row_once_for_any_world_that_divides():
    layout = LaneLayout(num_windows=640, rows=8)
    step = 37
    everything, _ = layout.windows(step)
    for world in (1, 2, 4, 8):
        parts = [layout.rank_rows(r, world) for r in range(world)]
        assert [row for p in parts for row in p] == list(range(8))
        assert np.array_equal(np.concatenate([layout.windows(step, p)[0] for p in parts]), everything)
    with pytest.raises(ValueError, match="do not divide among 3 ranks"):
        layout.rank_rows(0, 3)


def test_the_step_is_the_whole_cursor():
    """Any step's windows follow from the step alone: DESIGN.md's closed form, no replay."""
    layout = LaneLayout(num_windows=203, rows=4)
    lane = layout.lane_len
    for s in (0, 49, 50, 123, 149, 10_000):
        windows, reset = layout.windows(s)
        assert windows.tolist() == [j * lane + s % lane for j in range(4)]
        assert reset.tolist() == [s % lane == 0] * 4
    rotated = LaneLayout(num_windows=203, rows=4, rotation_seed=5)
    epoch, k = divmod(777, lane)
    offset = rotated.epoch_offset(epoch)
    assert rotated.windows(777)[0].tolist() == [(offset + j * lane + k) % 203 for j in range(4)]
    assert offset == 81  # pinned: the offsets must not change between versions (resume)


def test_too_few_windows_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than the 8 rows"):
        LaneLayout(num_windows=5, rows=8)
    with pytest.raises(ValueError, match="step"):
        LaneLayout(10, 2).windows(-1)
    with pytest.raises(ValueError, match="rows"):
        LaneLayout(100, 8).windows(0, range(6, 10))
    with pytest.raises(ValueError, match="rotation_seed"):
        LaneLayout(100, 8, rotation_seed=-1)
