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

Faults end the iteration with one error that names the culprit: a worker never raises through the
DataLoader (whose re-raise wraps the message in "Caught X in DataLoader worker process N" and a
traceback); it sends a ``_Failure`` in place of its part, and the main process stops every worker
and raises it. The workers ignore SIGTERM (a scheduler's SIGTERM is for the trainer), so stopping
them is the loader's job: see ``LaneLoader``.
"""

from __future__ import annotations

import atexit
import posixpath
import signal
import time
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zarvan_dist.config import ConfigError
from zarvan_dist.data.lanes import LaneLayout
from zarvan_dist.data.manifest import dataset_root
from zarvan_dist.data.neighbours import NeighbourReader
from zarvan_dist.data.reader import WindowReader, check_ids
from zarvan_dist.data.shards import DatasetError

_STOP_GRACE_S = 3.0
"""How long stopping waits for the workers to leave on their own before it kills them."""


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


@dataclass
class _Failure:
    """What a worker (or the in-process reader) sends in place of its part when reading fails."""

    error: type[Exception]
    """DatasetError or ConfigError: the type raised in the main process."""
    message: str
    """The error's message, naming the file (a shard's URL where the error came from a shard)."""
    context: str
    """Where in the lanes: the split, and the window and row being read."""

    def exception(self) -> Exception:
        """The error to raise in the main process, with this process's rank in a job."""
        return self.error(f"{self.message} ({self.context}{_rank()})")


def _rank() -> str:
    """", rank R" in a job (one loader per rank: the error says whose), else nothing."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f", rank {torch.distributed.get_rank()}"
    return ""


@dataclass
class _Reading:
    """What a worker is reading: its reader, and tokens or neighbours of which window for which row."""

    reader: WindowReader | None = None
    what: str | None = None
    window: int = -1
    row: int = -1


class _LaneStreams(IterableDataset):
    """A worker's rows, one micro-step at a time (a DataLoader dataset; see ``LaneLoader``).

    Yields its part of each micro-step, or one ``_Failure`` and then nothing: an exception never
    leaves a worker through the DataLoader.
    """

    check = True
    """Check each window's CRC-32 and ids (``WindowReader``); off only in benchmarks/bench_loader.py."""

    def __init__(self, url: str, split: str, layout: LaneLayout, rows: range, start: int,
                 neighbours: str | None) -> None:
        super().__init__()
        self.url, self.split, self.layout, self.rows, self.start = url, split, layout, rows, start
        self.neighbours = neighbours

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]
                                   | _Failure]:
        at = _Reading()
        try:
            yield from self._parts(at)
        except Exception as exc:  # every error goes to the main process as one _Failure; then this part ends
            yield self._failure(exc, at)

    def _parts(self, at: _Reading) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                      np.ndarray | None]]:
        """This worker's part of each micro-step; ``at`` says what it is reading (for ``_failure``)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = np.arange(self.rows.start, self.rows.stop)[worker::workers]
        # the ids of a micro-step's windows are checked below in one pass (a call per window costs 2% more)
        reader = at.reader = WindowReader(self.url, check=self.check, check_ids=False)
        vocab = reader.manifest.vocab_size
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
                at.what, at.window, at.row = "tokens", int(window), int(mine[i])
                if streams[i] is None or expected[i] != window:
                    streams[i] = reader.iter_windows(self.split, int(window))
                    if near:
                        near_streams[i] = near.iter_windows(self.split, int(window))
                tokens[i] = next(streams[i])
                if near:
                    at.what = "neighbours"
                    ids[i] = next(near_streams[i])[0]
                expected[i] = window + 1
            if self.check and len(mine) and np.maximum.reduce(tokens, axis=None) >= vocab:
                i = int(np.argmax((tokens >= vocab).any(1)))
                at.what, at.window, at.row = "tokens", int(windows[i]), int(mine[i])
                shard, offset = reader.manifest.locate(self.split, int(windows[i]))
                check_ids(tokens[i], vocab, f"{reader.url(shard.path)} sample {offset}")
            at.what = None
            # numpy, not tensors: pickled by value through the worker's pipe, where a tensor would go through
            # shared memory and a file descriptor passed over a Unix socket in TMPDIR (whose path length
            # is limited: a long TMPDIR made a worker fail to send and the trainer wait for ever)
            yield step, mine.astype(np.int64), windows, tokens, reset, ids
            step += 1

    def _failure(self, exc: Exception, at: _Reading) -> _Failure:
        """``exc`` as a _Failure naming the file (the shard being read, where the message names none), the
        split, and the window and row being read."""
        error = ConfigError if isinstance(exc, ConfigError) else DatasetError
        message = str(exc) if isinstance(exc, (DatasetError, ConfigError)) else f"{type(exc).__name__}: {exc}"
        if at.what is None or at.reader is None:
            source, context = self.url, f"split {self.split}"
        elif at.what == "tokens":
            source = at.reader.url(at.reader.manifest.locate(self.split, at.window)[0].path)
            context = f"split {self.split}, window {at.window}, row {at.row}"
        else:
            source, context = self.neighbours, f"split {self.split}, the neighbours of window {at.window}, row {at.row}"
        # the readers' errors name their shard (a URL under the dataset or the sidecar); others get one here
        if not any(root in message for root in (dataset_root(self.url), self.neighbours) if root):
            message = f"{source}: {message}"
        return _Failure(error, message, context)


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

    Iterate it (``iter(loader)``, a for loop) for ``LaneBatch``es; each iteration starts its own
    ``workers`` processes. They ignore SIGTERM, SIGUSR1 and SIGINT (a scheduler's SIGTERM asks the
    trainer for a checkpoint, and the workers must outlive it), so they are stopped here, never by a
    signal: ``close()`` the loader, leave its ``with`` block, ``close()`` or drop the iterator, or
    end the iteration with an error; at interpreter exit every iterator still open is closed. Each
    of these stops the workers within seconds and kills those that do not leave.

    Every shard of the split must have its manifest size when the loader is made (one listing per
    shard directory), and every window is checked as it is read (its CRC-32 in format version 2,
    its ids below ``vocab_size``). Any error while reading, in a worker or not, ends the iteration
    with one DatasetError (a ConfigError stays one) naming the shard, the split, the window and the
    row, and the rank in a job (the workers are stopped first).

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
        _check_shard_sizes(WindowReader(url), split)
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
        self._iterators: weakref.WeakSet = weakref.WeakSet()

    def __iter__(self) -> Iterator[LaneBatch]:
        """Batches without end; ``close()`` the iterator (or the loader) to stop its workers."""
        batches = self._batches()
        self._iterators.add(batches)
        _OPEN.add(batches)
        return batches

    def close(self) -> None:
        """Close every iterator of this loader: their workers are stopped (killed if they do not leave)."""
        for batches in list(self._iterators):
            _close(batches)

    def __enter__(self) -> LaneLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _batches(self) -> Iterator[LaneBatch]:
        parts = iter(self.loader)
        try:
            while True:
                # one part per worker, in worker order: workers hold rows w, w + W, ... of this step
                got = [self._next_part(parts) for _ in range(max(self.workers, 1))]
                step = got[0][0]
                rows, windows, tokens, reset = (np.concatenate([p[i] for p in got]) for i in range(1, 5))
                order = np.argsort(rows, kind="stable")
                neighbours = None
                if got[0][5] is not None:  # int32 through the pipe (half the bytes), int64 for the model
                    neighbours = torch.from_numpy(np.concatenate([p[5] for p in got])[order].astype(np.int64))
                yield LaneBatch(step, *(torch.from_numpy(np.ascontiguousarray(a[order]))
                                        for a in (rows, windows, tokens, reset)), neighbours=neighbours)
        finally:
            # before the error (if any) leaves: torch would stop the workers only when the iterator is
            # collected, which a traceback holding it delays to interpreter exit, where it does not
            _stop_workers(parts)

    def _next_part(self, parts: Iterator) -> tuple:
        try:
            part = next(parts)
        except Exception as exc:  # torch's own failures: a worker killed, or a part that could not be sent
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DatasetError(f"{self.dataset.url}: the lane loader of split {self.dataset.split} failed"
                               f"{_rank()}: {type(exc).__name__}: {first}") from None
        if isinstance(part, _Failure):
            raise part.exception()
        return part


_OPEN: weakref.WeakSet = weakref.WeakSet()
"""Every LaneLoader iterator not yet collected: closed at interpreter exit."""


def _close(batches: Iterator[LaneBatch]) -> None:
    try:
        batches.close()  # GeneratorExit at its yield: its finally stops the workers
    except ValueError:  # "generator already executing": closed from within its own iteration (a signal handler)
        pass


@atexit.register
def _close_open_iterators() -> None:
    # Registered after torch's and multiprocessing's exit hooks (this module imports torch first), so it
    # runs before them: torch's would turn the workers' shutdown into a no-op, and multiprocessing's
    # would SIGTERM the workers (ignored) and wait for them for ever.
    for batches in list(_OPEN):
        _close(batches)


def _stop_workers(parts: Iterator) -> None:
    """Stop the workers of a DataLoader iterator now: ask them to leave, wait ``_STOP_GRACE_S`` at most,
    kill those still there (they ignore SIGTERM), and let torch close its queues."""
    workers = list(getattr(parts, "_workers", ()))
    if not workers or getattr(parts, "_shutdown", True):
        return
    try:
        parts._workers_done_event.set()
        for queue in parts._index_queues:
            queue.put(None)  # a worker leaves its loop at None once the done event is set
    except (AttributeError, OSError, ValueError):
        pass
    deadline = time.monotonic() + _STOP_GRACE_S
    for w in workers:
        w.join(max(deadline - time.monotonic(), 0.0))
    if any(w.is_alive() for w in workers):
        # off torch's SIGCHLD watch first: a killed worker must not raise in this process
        if getattr(parts, "_worker_pids_set", False):
            from torch.utils.data._utils.signal_handling import _remove_worker_pids
            _remove_worker_pids(id(parts))
            parts._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(1.0)
    try:
        parts._shutdown_workers()  # closes the queues; the workers are gone, so it does not wait
    except (AttributeError, OSError, ValueError):  # cleanup only: never in place of the error being raised
        pass


def _check_shard_sizes(reader: WindowReader, split: str) -> None:
    """Raise DatasetError naming the first shard of ``split`` that is missing or whose size is not the
    manifest's. One listing per shard directory (not a call per shard on an object store)."""
    by_dir: dict[str, list] = {}
    for shard in reader.manifest.split(split).shards:
        by_dir.setdefault(posixpath.dirname(reader.fs_path(shard.path)), []).append(shard)
    for directory, shards in by_dir.items():
        reader.fs.invalidate_cache(directory)  # an object store's cached listing may predate a rewrite
        try:
            sizes = {entry["name"].rstrip("/"): entry.get("size") for entry in reader.fs.ls(directory, detail=True)}
        except FileNotFoundError:
            sizes = {}
        for shard in shards:
            path = reader.fs_path(shard.path)
            size = sizes.get(path)
            if size is None:  # not in the listing as named: ask for the file itself
                try:
                    size = reader.fs.size(path)
                except FileNotFoundError:
                    raise DatasetError(f"{reader.url(shard.path)}: shard listed in the manifest is missing") from None
            if size != shard.bytes:
                raise DatasetError(f"{reader.url(shard.path)}: {size} bytes, the manifest says {shard.bytes}: "
                                   f"the shard is truncated or was rewritten; rewrite the dataset or restore the shard")


class MixtureLoader:
    """``LaneLoader`` over a mixture: one LaneLoader per source that ``rows`` reach, their batches joined.

    Every micro-step yields one ``LaneBatch`` of the global ``rows`` in order, each row read from its
    source's lanes (``zarvan_dist.data.mixture.MixtureLayout``); ``windows`` are window indices in the
    row's own source. Each source's loader starts its own ``workers`` processes; ``close()`` (or leaving
    the ``with`` block, or closing an iterator) stops them all. One source with the rows from 0 is exactly
    its LaneLoader.
    """

    def __init__(self, urls: list[str], split: str, layout, rows: range | None = None, start: int = 0,
                 workers: int = 0, prefetch: int = 2, neighbours: str | None = None) -> None:
        self.rows = range(layout.rows) if rows is None else rows
        self.loaders = [(layout.starts[i], LaneLoader(urls[i], split, layout.layouts[i], rows=local, start=start,
                                                      workers=workers, prefetch=prefetch, neighbours=neighbours))
                        for i, local in layout.parts(self.rows)]

    def __iter__(self) -> Iterator[LaneBatch]:
        return self._batches()

    def close(self) -> None:
        for _, loader in self.loaders:
            loader.close()

    def __enter__(self) -> MixtureLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _batches(self) -> Iterator[LaneBatch]:
        streams = [(offset, iter(loader)) for offset, loader in self.loaders]
        try:
            if len(streams) == 1 and streams[0][0] == 0:
                yield from streams[0][1]
                return
            while True:
                got = [(offset, next(stream)) for offset, stream in streams]
                parts = [b for _, b in got]
                yield LaneBatch(parts[0].step, torch.cat([b.rows + offset for offset, b in got]),
                                torch.cat([b.windows for b in parts]), torch.cat([b.tokens for b in parts]),
                                torch.cat([b.reset for b in parts]),
                                None if parts[0].neighbours is None else torch.cat([b.neighbours for b in parts]))
        finally:
            for _, stream in streams:
                stream.close()
