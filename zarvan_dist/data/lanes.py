"""Lanes: which window each batch row reads at each micro-step (DESIGN.md, "the step is the cursor").

A global batch has G rows over a split of N windows. Row j reads lane j, the L = N // G
contiguous windows starting at ``offset(epoch) + j * L`` (modulo N), one window per micro-step:
micro-step s is step ``s mod L`` of epoch ``s // L``. Nothing else is needed to resume: the
micro-step count gives every row's window. Rank r of a world of R owns rows
``[r * G / R, (r + 1) * G / R)``, so a change of world size moves rows between ranks and nothing
else.

Each epoch may start the lanes at a seeded offset, so the N - G * L windows no lane reads are
not the same ones every epoch. A row's recurrent state resets where its stream is not
contiguous with the window before: at the start of a lane, and where a rotated lane wraps from
the split's last window to its first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zarvan_dist.data.hashing import splitmix64_outputs


def rank_rows(rows: int, rank: int, world: int) -> range:
    """The contiguous block of ``rows / world`` global rows that rank ``rank`` of ``world`` reads."""
    if world < 1 or rows % world:
        raise ValueError(f"the {rows} rows of the global batch do not divide among {world} ranks")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    per = rows // world
    return range(rank * per, (rank + 1) * per)


@dataclass(frozen=True)
class LaneLayout:
    """Windows of a split dealt to G rows, as a pure function of the micro-step."""

    num_windows: int
    """N, windows in the split."""
    rows: int
    """G, rows of the global batch."""
    rotation_seed: int | None = None
    """Seed of the per-epoch lane offset; None keeps every epoch's lanes at offset 0."""

    def __post_init__(self) -> None:
        if self.rotation_seed is not None and self.rotation_seed < 0:
            raise ValueError(f"rotation_seed: expected a non-negative integer or None, got {self.rotation_seed}")
        if self.rows < 1:
            raise ValueError(f"rows: expected a positive integer, got {self.rows}")
        if self.num_windows < self.rows:
            raise ValueError(
                f"the split has {self.num_windows} windows, fewer than the {self.rows} rows of the global "
                f"batch: each row needs a lane of at least one window (use fewer rows or more data)"
            )

    @property
    def lane_len(self) -> int:
        """L, windows per lane (micro-steps per epoch)."""
        return self.num_windows // self.rows

    def epoch_offset(self, epoch: int) -> int:
        """Window index where lane 0 starts in ``epoch``."""
        if self.rotation_seed is None or epoch == 0:
            return 0
        # plain integer hashing, so a library upgrade never moves a resumed run's lanes
        return int(splitmix64_outputs((self.rotation_seed << 32) ^ epoch, 1)[0] % np.uint64(self.num_windows))

    def rank_rows(self, rank: int, world: int) -> range:
        """The global rows rank ``rank`` of ``world`` reads."""
        return rank_rows(self.rows, rank, world)

    def windows(self, step: int, rows: range | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Window index and state reset of each row at micro-step ``step``.

        Returns:
            windows: [len(rows)] int64, the global window index within the split.
            reset: [len(rows)] bool, True where the row's state must be reset before this window
                (a lane start, or a rotated lane wrapping from window N-1 to window 0).
        """
        if step < 0:
            raise ValueError(f"step: expected a non-negative integer, got {step}")
        rows = range(self.rows) if rows is None else rows
        if rows.step != 1 or rows.start < 0 or rows.stop > self.rows:
            raise ValueError(f"rows {rows} are not a contiguous range inside the {self.rows} rows")
        lane = self.lane_len
        epoch, k = divmod(step, lane)
        start = self.epoch_offset(epoch) + np.arange(rows.start, rows.stop, dtype=np.int64) * lane
        windows = (start + k) % self.num_windows
        reset = np.full(len(rows), k == 0) | ((windows == 0) & (k > 0))
        return windows, reset
