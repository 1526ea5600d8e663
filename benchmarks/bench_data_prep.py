"""Throughput of the data path on the embedded corpus (this Python's standard library).

Prints tokens/s of raw sentencepiece encoding (one thread, the same batch call the job makes) and
of the whole ``shards`` job — reading, hashing, shuffling, encoding, writing shards and manifest —
at 1 and 2 workers, with the job's throughput per worker as a fraction of raw encoding (the
target is at least 0.9). Wall-clock ratios need idle cores (workers + 1 for the job's own
process) and a steady machine; two figures hold however busy it is: the CPU-time ratio (raw
encoding's CPU seconds over the job's, workers included), and the share of the
workers' time (wall clock x workers) spent inside the encode call, i.e. the job's throughput as a
fraction of raw encoding measured within the same run. Not a test: run it by hand.

    python benchmarks/bench_data_prep.py [--vocab-size 8192] [--seq-len 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import data_prep.shards
from data_prep.corpus import CorpusConfig, read_corpus
from data_prep.shards import ShardsConfig, document_batches, write_shards
from data_prep.tokenizer import TokenizerConfig, train_tokenizer
from zarvan_dist.tokenizer import encode_documents, load_tokenizer

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="use this model instead of training one on the corpus")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--sample-bytes", type=int, default=10_000_000, help="tokenizer training sample")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-docs", type=int, default=None, help="cap on documents (default: all)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    # The job's default shard (2**25 tokens) is larger than the whole embedded corpus (~9M
    # tokens): the job would write its one shard after encoding ends, a serial tail that a real
    # corpus, writing shards while the workers encode, does not have. 0 keeps the job's default.
    p.add_argument("--windows-per-shard", type=int, default=512,
                   help="windows per shard (default 512: about 18 shards on the embedded corpus; 0: the job's default)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is kept")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = os.path.join(tmp, "tokenizer.model")
            t = train_tokenizer(TokenizerConfig(out=tokenizer, vocab_size=args.vocab_size,
                                                sample_bytes=args.sample_bytes,
                                                corpus=CorpusConfig(max_docs=args.max_docs)), progress=False)
            print(f"tokenizer: bpe {t['vocab_size']} trained on {t['sample_bytes']:,} bytes in {t['seconds']:.1f} s")
        sp = load_tokenizer(tokenizer).processor
        docs, stats = read_corpus(CorpusConfig(max_docs=args.max_docs), progress=False)
        chars = sum(len(d.text) for d in docs)
        print(f"corpus: {stats.documents} documents, {chars:,} characters ({stats.description})")
        print(f"cpu cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")

        # Rounds interleave the measurements, so that a change of machine load hits all of them.
        wall = {w: float("inf") for w in [0, *args.workers]}   # 0: raw encoding
        cpu = dict(wall)
        # Share of the workers' capacity (wall time x workers) spent inside the encode call: the
        # job's throughput as a fraction of raw encoding measured in the same run, on the same
        # cores, so it holds however the machine's speed drifts between runs.
        share = {w: 0.0 for w in args.workers}
        data_prep.shards.encode_documents = _timed_encode
        tokens = 0
        for r in range(args.repeats):
            start, cpu0 = time.perf_counter(), _cpu_seconds()
            tokens = sum(len(ids) for batch in document_batches(docs)
                         for ids in sp.encode(batch, add_bos=True, num_threads=1, out_type="numpy"))
            wall[0], cpu[0] = min(wall[0], time.perf_counter() - start), min(cpu[0], _cpu_seconds() - cpu0)
            for workers in args.workers:
                cfg = ShardsConfig(tokenizer=tokenizer, out=os.path.join(tmp, f"ds-{workers}-{r}"),
                                   seq_len=args.seq_len, workers=workers,
                                   windows_per_shard=args.windows_per_shard or None,
                                   corpus=CorpusConfig(max_docs=args.max_docs))
                cpu0, _encode_seconds.value = _cpu_seconds(), 0.0
                s = write_shards(cfg, progress=False)
                shards = sum(split["shards"] for split in s["splits"].values())
                wall[workers], cpu[workers] = min(wall[workers], s["seconds"]), min(cpu[workers], _cpu_seconds() - cpu0)
                share[workers] = max(share[workers], _encode_seconds.value / (s["seconds"] * workers))
                assert s["tokens_encoded"] == tokens
        raw = tokens / wall[0]
        print(f"raw sentencepiece encode (1 thread): {tokens:,} tokens in {wall[0]:.2f} s = {raw:,.0f} tokens/s "
              f"({cpu[0]:.2f} CPU s)")
        for workers in args.workers:
            rate = tokens / wall[workers]
            print(f"shards job, {workers} worker(s), {shards} shards: {wall[workers]:.2f} s = {rate:,.0f} tokens/s; per worker "
                  f"{rate / workers / raw:.2f} x raw encoding (wall clock); {cpu[workers]:.2f} CPU s = "
                  f"{cpu[0] / cpu[workers]:.2f} x raw encoding's CPU efficiency")
        for workers in args.workers:
            print(f"{workers}-worker job: {share[workers]:.2f} of the workers' time (wall x workers) inside "
                  f"sentencepiece encoding (the rest: reading, hashing, shuffling, packing, writing, waiting)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (the job's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    main()
