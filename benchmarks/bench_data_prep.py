"""Throughput and memory of the data jobs. Not a test: run it by hand. Two modes.

**Embedded mode** (the default): throughput on the embedded corpus (this Python's standard library).
Prints tokens/s of raw sentencepiece encoding (one thread, the batch call the job makes) and of the
whole ``shards`` job, in this process -- reading, hashing, shuffling, encoding, writing shards and
manifest -- at 1 and 2 workers, with the job's throughput per worker as a fraction of raw encoding
(the target is at least 0.9).

    python benchmarks/bench_data_prep.py [--vocab-size 8192] [--seq-len 1024] [--repeats 3]

**Scale mode** (``--scale GB ...``): throughput and peak memory at corpus sizes. For each format and
size it writes (or reuses) a synthetic corpus of that many GB of document text (JSON lines and/or
parquet, see ``benchmarks/synthetic_corpus.py``; under ``.cache/bench_data_prep/``), then runs the
real command lines as subprocesses: ``python -m data_prep tokenizer``, ``shards --num-tasks T --tasks
0-(T-1)`` (T: about one task per ``--task-gb``) and ``merge``, sampling the resident memory of each
job's whole process tree (the job and its workers; RSS summed over the processes) every 50 ms.
Raw encoding is measured in this process on a sample of the same documents, before and after the
job (the best is kept). One table, then the issue's acceptance figures for the shards job's tree and
the tokenizer job: the peak at the largest size over the peak at the smallest (at most 1.25) and
every peak (per task, for the shards job) below 1.5 GB; and the job's throughput per worker against
raw encoding at the largest size (at least 0.9). The full measurement (both formats by default;
about 1.3G tokens to encode per format: roughly 30-45 minutes on 2 cores, ~13 GB of disk):

    python benchmarks/bench_data_prep.py --scale 0.1 1 4 [--format jsonl|parquet|both] [--workers 2]
        [--vocab-size 8192] [--sample-bytes 20000000] [--task-gb 1] [--keep] [--clean]

and a check that it all works, in a few minutes:

    python benchmarks/bench_data_prep.py --scale 0.02 0.05

GB is 1e9 bytes throughout. Summed RSS counts the pages the forked workers share with the job once
per process (an upper bound); the PSS column shares them out (sampled every 0.5 s). Generated
corpora are kept for the next run (``--clean`` removes them); each size's tokenizer and dataset are
removed after it is measured (``--keep`` keeps them). A results file with the figures and the memory
traces is written beside the corpora.

In both modes, wall-clock ratios need idle cores (workers + 1 for the job's own process) and a steady
machine; two figures hold however busy it is: the CPU-time ratio (raw encoding's CPU seconds per
token over the job's, workers included), and the share of the workers' time (wall clock x workers)
spent inside the encode call, i.e. the job's throughput as a fraction of raw encoding measured within
the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

import data_prep.shards
from data_prep.corpus import CorpusConfig, CorpusStats, iter_documents, plan_pieces
from data_prep.shards import ShardsConfig, document_batches, plan_job, write_shards
from data_prep.tokenizer import TokenizerConfig, train_tokenizer
from zarvan_dist.data.manifest import dtype_for_vocab
from zarvan_dist.tokenizer import encode_documents, load_tokenizer

from synthetic_corpus import CorpusSpec, data_files, ensure_corpus  # beside this script

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
RSS_RATIO_LIMIT = 1.25
RSS_LIMIT_GB = 1.5
PER_WORKER_TARGET = 0.9
_ENCODE_TIMER = "--encode-timer"

# Seconds spent inside the encode call, summed over the job's process and its workers: a shared
# counter, inherited by the worker processes the job forks after this module patched the call.
_encode_seconds = multiprocessing.Value("d", 0.0)


def _timed_encode(*args):
    """encode_documents, adding its wall time to ``_encode_seconds``."""
    start = time.perf_counter()
    out = encode_documents(*args)
    with _encode_seconds.get_lock():
        _encode_seconds.value += time.perf_counter() - start
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == _ENCODE_TIMER:
        run_timed_job(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, nargs="+", metavar="GB",
                   help="scale mode: synthetic corpora of these sizes (GB of text), e.g. 0.1 1 4")
    p.add_argument("--tokenizer", help="use this model instead of training one on the corpus")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--sample-bytes", type=int, default=None,
                   help="tokenizer training sample (default: 1e7 embedded, 2e7 scale mode)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="tokenizer processes per task (default: 1 2 embedded; one number in scale mode, default 2)")
    # The job's default shard (2**25 tokens) is larger than the whole embedded corpus (~9M
    # tokens): the job would write its one shard after encoding ends, a serial tail that a real
    # corpus, writing shards while the workers encode, does not have. 0 keeps the job's default.
    p.add_argument("--windows-per-shard", type=int, default=None,
                   help="windows per shard (default 512 embedded: about 18 shards on the embedded corpus; "
                        "0: the job's default, the default in scale mode)")
    e = p.add_argument_group("embedded mode")
    e.add_argument("--max-docs", type=int, default=None, help="cap on documents (default: all)")
    e.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is kept")
    s = p.add_argument_group("scale mode")
    s.add_argument("--format", choices=["jsonl", "parquet", "both"], default="both",
                   help="corpus format (default: both)")
    s.add_argument("--task-gb", type=float, default=1.0,
                   help="GB of text per task: --num-tasks is the size over this, rounded (default: 1)")
    s.add_argument("--file-mb", type=float, default=500, help="MB of text per corpus file (default: 500)")
    s.add_argument("--piece-mb", type=int, default=None, help="the job's --piece-mb (default: the job's)")
    s.add_argument("--raw-mb", type=float, default=20, help="MB of the corpus's text encoded raw (default: 20)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpora (default: 0)")
    s.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench_data_prep",
                   help="corpora, work files and results (default: .cache/bench_data_prep in the repository)")
    s.add_argument("--keep", action="store_true", help="keep each size's tokenizer and dataset")
    s.add_argument("--clean", action="store_true", help="remove the generated corpora at the end")
    s.add_argument("--interval", type=float, default=0.05, help="memory sampling interval, seconds (default: 0.05)")
    args = p.parse_args()
    if args.scale:
        scale_mode(args)
    else:
        embedded_mode(args)


# --- embedded mode -----------------------------------------------------------------------------


def embedded_mode(args: argparse.Namespace) -> None:
    workers_list = args.workers or [1, 2]
    sample_bytes = args.sample_bytes or 10_000_000
    windows_per_shard = 512 if args.windows_per_shard is None else args.windows_per_shard
    corpus = CorpusConfig(max_docs=args.max_docs)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = os.path.join(tmp, "tokenizer.model")
            t = train_tokenizer(TokenizerConfig(out=tokenizer, vocab_size=args.vocab_size, sample_bytes=sample_bytes,
                                                corpus=corpus), progress=False)
            print(f"tokenizer: bpe {t['vocab_size']} trained on {t['sample_bytes']:,} bytes in {t['seconds']:.1f} s")
        tok = load_tokenizer(tokenizer)
        sp, dtype = tok.processor, dtype_for_vocab(tok.vocab_size)
        # the documents the job reads, in its order (with --max-docs: the first of the shuffled pieces)
        plan = plan_job(ShardsConfig(tokenizer=tokenizer, out=tmp, seq_len=args.seq_len, corpus=corpus), tok.sha256)
        stats = CorpusStats(description=plan.stats.description)
        docs = list(iter_documents(plan.tasks[0], corpus, stats))
        batches = [texts for _, texts in document_batches(("train", d) for d in docs)]
        chars = sum(len(d.text) for d in docs)
        print(f"corpus: {stats.documents} documents, {chars:,} characters ({stats.description})")
        print(f"cpu cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")

        # Rounds interleave the measurements, so that a change of machine load hits all of them.
        wall = {w: float("inf") for w in [0, *workers_list]}   # 0: raw encoding
        cpu = dict(wall)
        # Share of the workers' capacity (wall time x workers) spent inside the encode call: the
        # job's throughput as a fraction of raw encoding measured in the same run, on the same
        # cores, so it holds however the machine's speed drifts between runs.
        share = {w: 0.0 for w in workers_list}
        data_prep.shards.encode_documents = _timed_encode
        tokens = shards = 0
        for r in range(args.repeats):
            start, cpu0 = time.perf_counter(), _cpu_seconds()
            tokens = sum(len(encode_documents(sp, texts, dtype)[0]) for texts in batches)
            wall[0], cpu[0] = min(wall[0], time.perf_counter() - start), min(cpu[0], _cpu_seconds() - cpu0)
            for workers in workers_list:
                cfg = ShardsConfig(tokenizer=tokenizer, out=os.path.join(tmp, f"ds-{workers}-{r}"),
                                   seq_len=args.seq_len, workers=workers,
                                   windows_per_shard=windows_per_shard or None, corpus=corpus)
                cpu0, _encode_seconds.value = _cpu_seconds(), 0.0
                s = write_shards(cfg, progress=False)
                shards = sum(split["shards"] for split in s["splits"].values())
                wall[workers], cpu[workers] = min(wall[workers], s["seconds"]), min(cpu[workers], _cpu_seconds() - cpu0)
                share[workers] = max(share[workers], _encode_seconds.value / (s["seconds"] * workers))
                assert s["tokens_encoded"] == tokens
        raw = tokens / wall[0]
        print(f"raw sentencepiece encode (1 thread): {tokens:,} tokens in {wall[0]:.2f} s = {raw:,.0f} tokens/s "
              f"({cpu[0]:.2f} CPU s)")
        for workers in workers_list:
            rate = tokens / wall[workers]
            print(f"shards job, {workers} worker(s), {shards} shards: {wall[workers]:.2f} s = {rate:,.0f} tokens/s; "
                  f"per worker {rate / workers / raw:.2f} x raw encoding (wall clock); {cpu[workers]:.2f} CPU s = "
                  f"{cpu[0] / cpu[workers]:.2f} x raw encoding's CPU efficiency")
        for workers in workers_list:
            print(f"{workers}-worker job: {share[workers]:.2f} of the workers' time (wall x workers) inside "
                  f"sentencepiece encoding (the rest: reading, hashing, shuffling, packing, writing, waiting)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (the job's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _children_cpu_seconds() -> float:
    """CPU seconds used so far by the finished children of this process (a job and the workers it waited for)."""
    t = os.times()
    return t.children_user + t.children_system


# --- scale mode --------------------------------------------------------------------------------


@dataclass
class JobRun:
    """One job run as a subprocess: its time and the memory of its process tree."""

    seconds: float
    cpu_seconds: float
    """CPU seconds of the job and its workers."""
    peak_rss: int
    """Largest sum of RSS over the process tree, bytes."""
    peak_pss: int
    """Largest sum of PSS (shared pages shared out) over the tree, bytes; sampled less often."""
    phase_peaks: list[int] = field(default_factory=list)
    """Peak summed RSS in each phase (for the shards job: each task)."""
    trace: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since start, summed RSS) of every sample."""
    output: str = ""


@dataclass
class ScaleRow:
    """The figures of one corpus (format, size)."""

    fmt: str
    gb: float
    documents: int
    text_bytes: int
    tasks: int
    tokens: int
    workers: int
    shards: JobRun
    merge: JobRun
    tokenizer: JobRun | None
    raw_tokens_per_s: float
    raw_cpu_s_per_token: float
    encode_seconds: float
    """Seconds inside the encode call, summed over the job's processes (0: not measured)."""
    corpus_seconds: float
    corpus_reused: bool

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.shards.seconds

    @property
    def per_worker(self) -> float:
        return self.tokens_per_s / self.workers / self.raw_tokens_per_s

    @property
    def cpu_efficiency(self) -> float:
        return self.raw_cpu_s_per_token / (self.shards.cpu_seconds / self.tokens)

    @property
    def encode_share(self) -> float:
        return self.encode_seconds / (self.shards.seconds * self.workers)


class TreeMemory:
    """Peak memory of process ``pid`` and its descendants, sampled from a thread every ``interval`` s.

    RSS is summed over the processes at each sample (the children listed again every ``interval * 5``),
    PSS every ``interval * 10`` (reading it costs milliseconds). ``phase()`` -- an int that only grows,
    e.g. the tasks finished -- splits the run into phases with a peak each.
    """

    def __init__(self, pid: int, interval: float, phase=None) -> None:
        self.pid, self.interval, self.phase = pid, interval, phase
        self.peak_rss = self.peak_pss = 0
        self.phase_peaks: list[int] = [0]
        self.trace: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        procs, k = [root], 0
        while not self._stop.is_set():
            if k % 5 == 0:
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    return
            rss = pss = 0
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                    if k % 10 == 0:
                        pss += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            if self.phase is not None:
                while self.phase() >= len(self.phase_peaks):
                    self.phase_peaks.append(0)
            self.phase_peaks[-1] = max(self.phase_peaks[-1], rss)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.trace.append((round(time.perf_counter() - self._start, 3), rss))
            k += 1
            self._stop.wait(self.interval)


def run_job(argv: list[str], interval: float, phase=None) -> JobRun:
    """Run ``argv`` (a job's command line) from the repository root, watching its process tree's memory."""
    cpu0 = _children_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = TreeMemory(proc.pid, interval, phase)
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    watch.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit status {proc.returncode}):\n{output}")
    return JobRun(seconds, _children_cpu_seconds() - cpu0, watch.peak_rss, watch.peak_pss, watch.phase_peaks, watch.trace,
                  output)


def run_timed_job(seconds_file: str, argv: list[str]) -> None:
    """``python -m data_prep ARGV`` with the encode call timed (in the job and its forked workers);
    writes the seconds spent in it to ``seconds_file`` and exits with the job's status."""
    from data_prep.__main__ import main as data_prep_main

    data_prep.shards.encode_documents = _timed_encode
    status = data_prep_main(argv)
    Path(seconds_file).write_text(f"{_encode_seconds.value}\n")
    sys.exit(status)


def raw_encoding(tokenizer: str, inputs: list[str], sample_bytes: float) -> tuple[float, float]:
    """Raw sentencepiece encoding of about ``sample_bytes`` of the corpus's text (an equal share from each
    piece), one thread, the batches and call the job makes. Returns (tokens/s, CPU seconds per token)."""
    tok = load_tokenizer(tokenizer)
    sp, dtype = tok.processor, dtype_for_vocab(tok.vocab_size)
    cfg = CorpusConfig(inputs=inputs)
    pieces, _ = plan_pieces(cfg)
    quota = sample_bytes / len(pieces)
    docs = []
    for piece in pieces:
        taken = 0
        for doc in iter_documents([piece], cfg, CorpusStats()):
            docs.append(doc)
            taken += len(doc.text)
            if taken >= quota:
                break
    batches = [texts for _, texts in document_batches(("train", d) for d in docs)]
    start, cpu0 = time.perf_counter(), time.process_time()
    tokens = sum(len(encode_documents(sp, texts, dtype)[0]) for texts in batches)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return tokens / seconds, cpu / tokens


def measure_size(args: argparse.Namespace, fmt: str, gb: float, workers: int) -> ScaleRow:
    """Corpus, tokenizer job, raw encoding, shards tasks, merge, raw encoding again: one row."""
    spec = CorpusSpec(fmt, int(gb * GB), int(args.file_mb * 1e6), args.seed)
    print(f"\n[{fmt} {gb:g} GB] corpus {args.cache_dir / spec.name} ...", flush=True)
    corpus = ensure_corpus(args.cache_dir, spec)
    print(f"  {'reused' if corpus.reused else 'written in ' + f'{corpus.seconds:.1f} s'}: {corpus.documents:,} "
          f"documents, {corpus.text_bytes / GB:.3f} GB of text in {corpus.files} files "
          f"({corpus.disk_bytes / GB:.3f} GB on disk)", flush=True)
    inputs = data_files(corpus)
    work = args.cache_dir / "work" / spec.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    py = sys.executable
    tokenizer_run = None
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(work / "tokenizer.model")
        tokenizer_run = run_job([py, "-m", "data_prep", "tokenizer", "--input", *inputs, "--out", tokenizer,
                                 "--vocab-size", str(args.vocab_size), "--sample-bytes",
                                 str(args.sample_bytes or 20_000_000), "--quiet"], args.interval)
        print(f"  tokenizer job: {tokenizer_run.seconds:.1f} s, peak RSS {tokenizer_run.peak_rss / GB:.2f} GB",
              flush=True)
    raw_before = raw_encoding(tokenizer, inputs, args.raw_mb * 1e6)
    print(f"  raw encoding: {raw_before[0]:,.0f} tokens/s", flush=True)

    tasks = max(1, round(gb / args.task_gb))
    out = work / "dataset"
    seconds_file = work / "encode_seconds"
    job = ["--input", *inputs, "--tokenizer", tokenizer, "--out", str(out), "--seq-len", str(args.seq_len),
           "--workers", str(workers), "--num-tasks", str(tasks), "--tasks", f"0-{tasks - 1}", "--quiet"]
    if args.windows_per_shard:
        job += ["--windows-per-shard", str(args.windows_per_shard)]
    if args.piece_mb:
        job += ["--piece-mb", str(args.piece_mb)]

    done = [0]

    def finished_tasks() -> int:  # a task's task.json is written last: it marks the task's end
        while done[0] < tasks and (out / "tasks" / f"{done[0]:05d}" / "task.json").exists():
            done[0] += 1
        return done[0]

    shards_run = run_job([py, __file__, _ENCODE_TIMER, str(seconds_file), "shards", *job], args.interval,
                         finished_tasks)
    shards_run.phase_peaks = shards_run.phase_peaks[:tasks]  # after the last task.json: the job's exit
    print(f"  shards job, {tasks} task(s): {shards_run.seconds:.1f} s, peak RSS {shards_run.peak_rss / GB:.2f} GB",
          flush=True)
    merge_run = run_job([py, "-m", "data_prep", "merge", "--out", str(out)], args.interval)
    manifest = json.loads((out / "manifest.json").read_text())
    documents = manifest["corpus"]["documents"]
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    if documents != corpus.documents:
        print(f"  WARNING: the job read {documents:,} documents of the corpus's {corpus.documents:,}")
    raw_after = raw_encoding(tokenizer, inputs, args.raw_mb * 1e6)
    raw = max(raw_before, raw_after)
    encode_seconds = float(seconds_file.read_text()) if seconds_file.exists() else 0.0
    if not args.keep:
        shutil.rmtree(work)
        with contextlib.suppress(OSError):
            work.parent.rmdir()
    return ScaleRow(fmt=fmt, gb=gb, documents=documents, text_bytes=corpus.text_bytes, tasks=tasks, tokens=tokens,
                    workers=workers, shards=shards_run, merge=merge_run, tokenizer=tokenizer_run,
                    raw_tokens_per_s=raw[0], raw_cpu_s_per_token=min(raw_before[1], raw_after[1]),
                    encode_seconds=encode_seconds,
                    corpus_seconds=corpus.seconds, corpus_reused=corpus.reused)


def scale_mode(args: argparse.Namespace) -> None:
    workers_list = args.workers or [2]
    if len(workers_list) != 1:
        raise SystemExit("scale mode takes one --workers number")
    workers = workers_list[0]
    formats = ["jsonl", "parquet"] if args.format == "both" else [args.format]
    sizes = sorted(args.scale)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"cpu cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; memory "
          f"{psutil.virtual_memory().total / GB:.1f} GB; {workers} worker(s) per task; cache {args.cache_dir}")
    need = sum(gb * GB * (1.1 if fmt == "jsonl" else 0.6) for fmt in formats for gb in sizes) + max(sizes) * GB
    if shutil.disk_usage(args.cache_dir).free < need:
        print(f"warning: {shutil.disk_usage(args.cache_dir).free / GB:.1f} GB free under {args.cache_dir}; the corpora "
              f"and the largest dataset may need up to {need / GB:.1f} GB (less where corpora are reused)")
    start = time.perf_counter()
    rows = [measure_size(args, fmt, gb, workers) for fmt in formats for gb in sizes]
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s in all\n")
    print_table(rows)
    print_acceptance(rows, formats)
    results = args.cache_dir / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                   "rows": [asdict(r) for r in rows]}) + "\n")
    print(f"\nfigures and memory traces: {results}")
    if args.clean:
        for fmt in formats:
            for gb in sizes:
                for path in args.cache_dir.glob(f"{fmt}-{gb:g}GB-*"):
                    shutil.rmtree(path)
        print(f"removed the generated corpora under {args.cache_dir}")
    else:
        used = sum(f.stat().st_size for f in args.cache_dir.rglob("*") if f.is_file())
        print(f"kept the generated corpora for the next run: {used / GB:.2f} GB under {args.cache_dir} "
              f"(--clean removes them)")


def print_table(rows: list[ScaleRow]) -> None:
    head = (f"{'GB':>6} {'format':<8}{'docs':>10}{'tokens':>14}{'tasks':>6}{'job s':>9}{'tok/s':>10}{'/wkr':>6}"
            f"{'cpu':>6}{'enc':>6}{'RSS job':>9}{'RSS task':>9}{'PSS job':>8}{'tok RSS':>8}{'tok s':>8}{'merge s':>8}")
    print(head)
    for r in rows:
        tok = r.tokenizer
        print(f"{r.gb:>6g} {r.fmt:<8}{r.documents:>10,}{r.tokens:>14,}{r.tasks:>6}{r.shards.seconds:>9.1f}"
              f"{r.tokens_per_s:>10,.0f}{r.per_worker:>6.2f}{r.cpu_efficiency:>6.2f}"
              f"{r.encode_share if r.encode_seconds else float('nan'):>6.2f}"
              f"{r.shards.peak_rss / GB:>9.3f}{max(r.shards.phase_peaks) / GB:>9.3f}{r.shards.peak_pss / GB:>8.3f}"
              f"{tok.peak_rss / GB if tok else float('nan'):>8.3f}{tok.seconds if tok else float('nan'):>8.1f}"
              f"{r.merge.seconds:>8.1f}")
    print("job s: wall seconds of `shards --tasks 0-(T-1)` (process start included); tok/s: tokens / job s;\n"
          "/wkr: tok/s per worker over raw encoding's (wall clock: needs workers + 1 idle cores);\n"
          "cpu: raw encoding's CPU s per token over the job tree's; enc: share of the workers' wall time inside the "
          "encode call;\nRSS job / task: peak of the job tree's summed RSS, over the run / the largest of its tasks "
          "(GB);\nPSS job: the same with shared pages shared out (sampled every 10th time);\n"
          "tok RSS / tok s: the tokenizer job's peak tree RSS (GB) and seconds; merge s: wall seconds of `merge`.")
    for r in rows:
        if len(r.shards.phase_peaks) > 1:
            print(f"{r.fmt} {r.gb:g} GB: per-task peak RSS (GB) " +
                  " ".join(f"{p / GB:.3f}" for p in r.shards.phase_peaks))
        trace = [rss for _, rss in r.shards.trace]
        half = len(trace) // 2
        if half:
            print(f"{r.fmt} {r.gb:g} GB: shards job peak RSS in the run's first half {max(trace[:half]) / GB:.3f} GB, "
                  f"second half {max(trace[half:]) / GB:.3f} GB")


def print_acceptance(rows: list[ScaleRow], formats: list[str]) -> None:
    print()

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    for fmt in formats:
        mine = [r for r in rows if r.fmt == fmt]
        lo, hi = mine[0], mine[-1]
        task_peak = max(max(r.shards.phase_peaks) for r in mine)
        ratio = hi.shards.peak_rss / lo.shards.peak_rss
        print(f"{fmt}: shards job peak RSS at {hi.gb:g} GB / at {lo.gb:g} GB = {ratio:.2f} "
              f"(<= {RSS_RATIO_LIMIT}: {verdict(ratio <= RSS_RATIO_LIMIT)}); largest per task {task_peak / GB:.3f} GB "
              f"with {hi.workers} workers (< {RSS_LIMIT_GB} GB: {verdict(task_peak < RSS_LIMIT_GB * GB)})")
        if lo.tokenizer and hi.tokenizer:
            ratio = hi.tokenizer.peak_rss / lo.tokenizer.peak_rss
            peak = max(r.tokenizer.peak_rss for r in mine)
            print(f"{fmt}: tokenizer peak RSS at {hi.gb:g} GB / at {lo.gb:g} GB = {ratio:.2f} "
                  f"(<= {RSS_RATIO_LIMIT}: {verdict(ratio <= RSS_RATIO_LIMIT)}); largest {peak / GB:.3f} GB "
                  f"(< {RSS_LIMIT_GB} GB: {verdict(peak < RSS_LIMIT_GB * GB)})")
        print(f"{fmt}: throughput per worker at {hi.gb:g} GB {hi.per_worker:.2f} x raw encoding "
              f"(>= {PER_WORKER_TARGET}: {verdict(hi.per_worker >= PER_WORKER_TARGET)}; wall clock, {os.cpu_count()} "
              f"cores for {hi.workers} workers + the job: with fewer than {hi.workers + 1} idle cores read the cpu "
              f"({hi.cpu_efficiency:.2f}) and enc ({hi.encode_share:.2f}) columns instead)")


if __name__ == "__main__":
    main()
