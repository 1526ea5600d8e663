"""The lane loader: each batch row streams its lane's windows in order, read by DataLoader workers.

``LaneLoader(url, split, layout, rows, start)`` yields one ``LaneBatch`` per micro-step from
micro-step ``start`` on. Row j's windows come from ``layout`` (``LaneLayout``), so the micro-step
is the whole cursor: resuming at step s opens every row's stream at the window the layout gives
for s, at its byte offset in its shard, and replays nothing. The rows are dealt to the workers
(worker w streams rows w, w + W, ...); each worker keeps one webdataset stream per row open across
shard boundaries and yields its part of every micro-step, and the DataLoader's in-order round
robin puts the parts back together.

With ``neighbours`` (a sidecar directory, ``zarvan_dist.data.neighbours``) each row also streams
the retrieved neighbours of its windows, opened and re-opened together with its tokens, so a
batch's neighbours are always those of the windows it holds.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zarvan_dist.data.lanes import LaneLayout
from zarvan_dist.data.neighbours import NeighbourReader
from zarvan_dist.data.reader import WindowReader


@dataclass
class LaneBatch:
    """One micro-step of a group of rows."""

    step: int
    """The micro-step."""
    rows: torch.Tensor
    """[R] int64, the global rows, in increasing order."""
    windows: torch.Tensor
    """[R] int64, the window of the split each row reads."""
    tokens: torch.Tensor
    """[R, seq_len + 1] int64, the windows' tokens."""
    reset: torch.Tensor
    """[R] bool, the row's carried state must be reset before this window (a lane start or wrap)."""
    neighbours: torch.Tensor | None = None
    """[R, n, K, L] int64, the retrieved neighbours of each chunk of the windows' inputs (-1: padding),
    n = ceil(seq_len / C); None when the loader was given no sidecar."""

    @property
    def inputs(self) -> torch.Tensor:
        """[R, seq_len] model inputs."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """[R, seq_len] next-token targets."""
        return self.tokens[:, 1:]


class _LaneStreams(IterableDataset):
    """A worker's rows, one micro-step at a time (a DataLoader dataset; see ``LaneLoader``)."""

    def __init__(self, url: str, split: str, layout: LaneLayout, rows: range, start: int,
                 neighbours: str | None) -> None:
        super().__init__()
        self.url, self.split, self.layout, self.rows, self.start = url, split, layout, rows, start
        self.neighbours = neighbours

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = np.arange(self.rows.start, self.rows.stop)[worker::workers]
        reader = WindowReader(self.url)
        # LaneLoader checked that the sidecar belongs to the dataset
        near = NeighbourReader(self.neighbours) if self.neighbours is not None else None
        streams: list[Iterator[np.ndarray] | None] = [None] * len(mine)
        near_streams: list[Iterator[tuple[np.ndarray, np.ndarray]] | None] = [None] * len(mine)
        expected = np.full(len(mine), -1, dtype=np.int64)
        seq_len = reader.manifest.seq_len
        step = self.start
        while True:
            windows, reset = self.layout.windows(step, self.rows)
            windows, reset = windows[mine - self.rows.start], reset[mine - self.rows.start]
            tokens = np.empty((len(mine), seq_len + 1), dtype=np.int64)
            ids = np.empty((len(mine), *near.ids_shape), dtype=np.int32) if near else None
            for i, window in enumerate(windows):
                if streams[i] is None or expected[i] != window:
                    streams[i] = reader.iter_windows(self.split, int(window))
                    if near:
                        near_streams[i] = near.iter_windows(self.split, int(window))
                tokens[i] = next(streams[i])
                if near:
                    ids[i] = next(near_streams[i])[0]
                expected[i] = window + 1
            # numpy, not tensors: pickled by value through the worker's pipe, where a tensor would go through
            # shared memory and a file descriptor passed over a Unix socket in TMPDIR (whose path length
            # is limited: a long TMPDIR made a worker fail to send and the trainer wait for ever)
            yield step, mine.astype(np.int64), windows, tokens, reset, ids
            step += 1


def _as_is(part):
    """The DataLoader's collate function: a worker's part goes to the main process untouched."""
    return part


def _quiet_worker(worker_id: int) -> None:
    # A scheduler's SIGTERM / SIGUSR1 asks the trainer for a checkpoint; workers must outlive it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LaneLoader:
    """Micro-step batches of ``rows`` of a split's lanes, from micro-step ``start`` on, without end.

    Args:
        url: the dataset (directory or manifest URL, any fsspec scheme).
        split: ``train`` or ``val``.
        layout: the lanes of the split.
        rows: the global rows to read (a rank's share of the global batch).
        start: the first micro-step.
        workers: DataLoader worker processes (0 reads in this process).
        prefetch: micro-steps each worker reads ahead.
        neighbours: the dataset's neighbour sidecar directory (any fsspec scheme); each batch then
            carries the neighbours of its windows. A sidecar of another dataset is a ConfigError.
    """

    def __init__(self, url: str, split: str, layout: LaneLayout, rows: range | None = None,
                 start: int = 0, workers: int = 0, prefetch: int = 2, neighbours: str | None = None) -> None:
        self.rows = range(layout.rows) if rows is None else rows
        layout.windows(start, self.rows)  # validates the rows and the step
        if neighbours is not None:
            NeighbourReader(neighbours, dataset=url)  # here, not in a worker: a clear error at once
        self.workers = min(workers, len(self.rows))
        self.dataset = _LaneStreams(url, split, layout, self.rows, start, neighbours)
        self.loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers,
            prefetch_factor=prefetch if self.workers else None,
            worker_init_fn=_quiet_worker if self.workers else None, collate_fn=_as_is,
            # the DataLoader draws its workers' base seed from this generator, not from the global
            # RNG that a checkpoint restores (dropout after a resume must match the uninterrupted run)
            generator=torch.Generator(),
        )

    def __iter__(self) -> Iterator[LaneBatch]:
        """Batches without end; ``close()`` the iterator to stop the workers (they ignore SIGTERM)."""
        parts = iter(self.loader)
        try:
            while True:
                # one part per worker, in worker order: workers hold rows w, w + W, ... of this step
                got = [next(parts) for _ in range(max(self.workers, 1))]
                step = got[0][0]
                rows, windows, tokens, reset = (np.concatenate([p[i] for p in got]) for i in range(1, 5))
                order = np.argsort(rows, kind="stable")
                neighbours = None
                if got[0][5] is not None:  # int32 through the pipe (half the bytes), int64 for the model
                    neighbours = torch.from_numpy(np.concatenate([p[5] for p in got])[order].astype(np.int64))
                yield LaneBatch(step, *(torch.from_numpy(np.ascontiguousarray(a[order]))
                                        for a in (rows, windows, tokens, reset)), neighbours=neighbours)
        finally:
            # dropping the DataLoader iterator shuts its workers down (None on their queues, then join)
            del parts
