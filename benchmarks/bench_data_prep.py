"""Throughput of the data path on the embedded corpus (this Python's standard library).

Prints tokens/s of raw sentencepiece encoding (one thread, the same batch call the job makes) and
of the whole ``shards`` job — reading, hashing, shuffling, encoding, writing shards and manifest —
at 1 and 2 workers, with the job's throughput per worker as a fraction of raw encoding (the
target is at least 0.9). Wall-clock ratios need idle cores (workers + 1 for the job's own
process) and a steady machine; two figures hold however busy it is: the CPU-time ratio (raw
encoding's CPU seconds over the job's, workers included), and, at 1 worker, the share of the job's
own wall time spent inside the encode call. Not a test: run it by hand.

    python benchmarks/bench_data_prep.py [--vocab-size 8192] [--seq-len 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import data_prep.shards
from data_prep.corpus import CorpusConfig, read_corpus
from data_prep.shards import ShardsConfig, document_batches, write_shards
from data_prep.tokenizer import TokenizerConfig, encode_documents, load_tokenizer, train_tokenizer

_encode_seconds = [0.0]


def _timed_encode(*args):
    """encode_documents, adding its wall time to ``_encode_seconds[0]`` (in-process worker only)."""
    start = time.perf_counter()
    out = encode_documents(*args)
    _encode_seconds[0] += time.perf_counter() - start
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
        sp, _ = load_tokenizer(tokenizer)
        docs, stats = read_corpus(CorpusConfig(max_docs=args.max_docs), progress=False)
        chars = sum(len(d.text) for d in docs)
        print(f"corpus: {stats.documents} documents, {chars:,} characters ({stats.description})")
        print(f"cpu cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")

        # Rounds interleave the measurements, so that a change of machine load hits all of them.
        wall = {w: float("inf") for w in [0, *args.workers]}   # 0: raw encoding
        cpu = dict(wall)
        share = 0.0   # best share of the 1-worker job's time spent encoding
        # With 1 worker the job encodes in this process, so timing the call it makes shows the
        # job's overhead from within one run.
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
                cpu0, _encode_seconds[0] = _cpu_seconds(), 0.0
                s = write_shards(cfg, progress=False)
                shards = sum(split["shards"] for split in s["splits"].values())
                wall[workers], cpu[workers] = min(wall[workers], s["seconds"]), min(cpu[workers], _cpu_seconds() - cpu0)
                if workers == 1:
                    share = max(share, _encode_seconds[0] / s["seconds"])
                assert s["tokens_encoded"] == tokens
        raw = tokens / wall[0]
        print(f"raw sentencepiece encode (1 thread): {tokens:,} tokens in {wall[0]:.2f} s = {raw:,.0f} tokens/s "
              f"({cpu[0]:.2f} CPU s)")
        for workers in args.workers:
            rate = tokens / wall[workers]
            print(f"shards job, {workers} worker(s), {shards} shards: {wall[workers]:.2f} s = {rate:,.0f} tokens/s; per worker "
                  f"{rate / workers / raw:.2f} x raw encoding (wall clock); {cpu[workers]:.2f} CPU s = "
                  f"{cpu[0] / cpu[workers]:.2f} x raw encoding's CPU efficiency")
        if 1 in args.workers:
            print(f"1-worker job: {share:.2f} of its wall time inside sentencepiece encoding "
                  f"(the rest is reading, hashing, shuffling, packing, writing)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (the job's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    main()
