"""Lane loader throughput with the window checks on and off: what reading safely costs.

Writes a synthetic token dataset (format version 2: a CRC-32 per window; random ids, ``--windows``
windows of ``--seq-len`` tokens in shards of ``--windows-per-shard``) with the trainer tests' writer,
then streams ``--rows`` lanes through ``LaneLoader`` with 0 and 2 workers and reports windows/s with
each window's checks (its CRC-32 and its ids below the vocabulary) on and off. Off is a switch for
this measurement only (``_LaneStreams.check``); the library always checks. The shards sit in the page
cache after writing, so this is the CPU cost of reading, the case where the checks weigh most.

Each figure is the best of ``--repeats`` timed passes of ``--steps`` micro-steps after a warm-up (the
workers' start is not timed), per second of wall time and per CPU second of the loader's processes
(on Linux; steadier than wall time on a busy machine, but counted in clock ticks for the workers);
on and off alternate so that a busy machine slows both alike. Also printed: the cost per window of
streaming a window unchecked, of its CRC-32 and of its share of the id check (made once per micro-step
over all its rows, as the loader does), timed alone in one process.

    python benchmarks/bench_loader.py                 # ~70 MB dataset in a temporary directory, ~1 min
    python benchmarks/bench_loader.py --steps 100     # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.pretrain.token_data import write_token_dataset  # noqa: E402
from zarvan_dist.data import LaneLayout, WindowReader  # noqa: E402
from zarvan_dist.data.loader import LaneLoader  # noqa: E402
from zarvan_dist.data.shards import window_crc  # noqa: E402


def write_dataset(root: Path, windows: int, seq_len: int, vocab: int, per_shard: int, seed: int = 0) -> None:
    """``windows`` train windows of random ids in [4, vocab), a few val windows."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(4, vocab, windows * seq_len + 1)
    stream[0] = 1
    write_token_dataset(root, {"train": stream, "val": stream[:4 * seq_len + 1]}, seq_len, vocab, per_shard)


def cpu_seconds() -> float | None:
    """CPU time of this process and its running children (the loader's workers); None where Linux's
    /proc does not list a process's children."""
    pid, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        total = time.process_time()
        for child in children:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total
    except OSError:
        return None


def windows_per_s(url: str, layout: LaneLayout, workers: int, check: bool, steps: int,
                  warmup: int) -> tuple[float, float | None]:
    """Windows per second of wall time and per CPU second (this process and the workers; None where
    unknown) of ``steps`` micro-steps of every row, after ``warmup`` untimed ones."""
    with LaneLoader(url, "train", layout, workers=workers, prefetch=4) as loader:
        loader.dataset.check = check  # before the iteration: its workers start with it
        batches = iter(loader)
        for _ in islice(batches, warmup):
            pass
        cpu, started = cpu_seconds(), time.perf_counter()
        n = sum(len(batch.rows) for batch in islice(batches, steps))
        wall, cpu_end = time.perf_counter() - started, cpu_seconds()
        # the workers read ahead by up to ``prefetch`` steps each, at both ends alike
        return n / wall, (n / (cpu_end - cpu) if cpu is not None and cpu_end is not None else None)


def per_window_us(url: str, rows: int, samples: int = 2000, repeats: int = 5) -> tuple[float, float, float]:
    """Microseconds per window, in this process, best of ``repeats``: streaming a window unchecked
    (``WindowReader.iter_windows``), its CRC-32, and its share of the id check the loader makes once per
    micro-step over the ``rows`` windows (int64, as the loader holds them)."""
    reader = WindowReader(url, check=False)
    vocab = reader.manifest.vocab_size
    read = crc = ids = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        windows = list(islice(reader.iter_windows("train"), samples))
        read = min(read, time.perf_counter() - started)
        started = time.perf_counter()
        for w in windows:
            window_crc(w)
        crc = min(crc, time.perf_counter() - started)
        steps = [np.stack(windows[i:i + rows]).astype(np.int64) for i in range(0, len(windows), rows)]
        started = time.perf_counter()
        for step in steps:
            if np.maximum.reduce(step, axis=None) >= vocab:
                raise AssertionError("the synthetic ids are below the vocabulary")
        ids = min(ids, time.perf_counter() - started)
    return 1e6 * read / samples, 1e6 * crc / samples, 1e6 * ids / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16000, help="train windows of the synthetic dataset")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--windows-per-shard", type=int, default=500)
    parser.add_argument("--rows", type=int, default=8, help="rows (lanes) the loader streams")
    parser.add_argument("--steps", type=int, default=600, help="timed micro-steps per pass")
    parser.add_argument("--warmup", type=int, default=20, help="untimed micro-steps before each pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting (the best is kept)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dir", default=None, help="where to write the dataset (default: a temporary directory)")
    args = parser.parse_args()
    lane = args.windows // args.rows
    if args.warmup + args.steps > lane:
        parser.error(f"--warmup + --steps ({args.warmup + args.steps}) exceed a lane ({lane} windows): "
                     f"the passes would wrap into the next epoch")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        url = str(Path(tmp) / "tokens")
        started = time.perf_counter()
        write_dataset(Path(url), args.windows, args.seq_len, args.vocab, args.windows_per_shard)
        size = sum(p.stat().st_size for p in Path(url).rglob("*.tar"))
        print(f"dataset: {args.windows} windows of {args.seq_len} tokens, vocab {args.vocab}, "
              f"{size / 2**20:.0f} MiB in shards of {args.windows_per_shard} ({time.perf_counter() - started:.1f} s)")
        layout = LaneLayout(args.windows, args.rows)
        print(f"loader: {args.rows} rows, {args.steps} timed micro-steps x {args.repeats} passes (best kept)\n")
        print(f"{'workers':>7} {'per':>4} {'checks on':>14} {'checks off':>14} {'on / off':>9} {'cost':>7}")
        for workers in args.workers:
            best = {(check, per): 0.0 for check in (True, False) for per in ("wall", "cpu")}
            for k in range(args.repeats):
                for check in ((True, False) if k % 2 == 0 else (False, True)):
                    wall, cpu = windows_per_s(url, layout, workers, check, args.steps, args.warmup)
                    best[check, "wall"] = max(best[check, "wall"], wall)
                    best[check, "cpu"] = max(best[check, "cpu"], cpu or 0.0)
            for per, unit in (("wall", "w/s"), ("cpu", "w/cpu-s")):
                if best[True, per] and best[False, per]:
                    ratio = best[True, per] / best[False, per]
                    print(f"{workers:>7} {per:>4} {best[True, per]:>10,.0f} {unit:<3} {best[False, per]:>10,.0f} "
                          f"{unit:<3} {ratio:>9.3f} {100 * (1 - ratio):>6.1f}%", flush=True)
        read, crc, ids = per_window_us(url, args.rows)
        print(f"\nper window of {args.seq_len + 1} tokens in one process (best of 5): streamed unchecked {read:.1f} us, "
              f"CRC-32 {crc:.1f} us, id check (one per micro-step of {args.rows} rows) {ids:.1f} us: the checks add "
              f"{100 * (crc + ids) / read:.1f}%")


if __name__ == "__main__":
    main()
