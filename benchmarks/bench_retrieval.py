"""Retrieval at corpus scale on CPU: embedding, index build, query throughput and recall@10.

Builds a retrieval corpus of about --chunks chunks of 64 tokens from real text (random tokens
would make every IVF list alike) and times the ``retrieval`` jobs on it:

1. corpus: this machine's Python sources (default: the standard library directory and this
   interpreter's site-packages; with pyenv the standard library directory also holds the base
   interpreter's site-packages), one document per distinct file (files of equal content kept
   once), in a seeded shuffled order so that any prefix mixes all packages. Written once as
   WORK/corpus-HASH.jsonl (about 250 MB for ~80M tokens) and reused.
2. tokens: the ``shards`` job (seq_len 256, one worker per core) on the first ``max_docs`` lines,
   ``max_docs`` chosen from the files' sizes and a sample's bytes per token so that the train split
   cuts into at least --chunks chunks (counted exactly after the job; too few and the job runs
   again with more documents). The val split (--val-fraction of the documents) holds the held-out
   queries. Kept in WORK/chunks-N/dataset and reused by a later run of the same settings (the job
   then checks its shards and only re-reads the corpus).
3. embed: the ``retrieval embed`` job (hashed n-gram embedder, dim 256) on the train split:
   chunks/s of the whole job (reading the stream, cutting, embedding, writing shards).
4. index: the ``retrieval index`` job at the default IndexConfig (ivf_flat, nlist 4 sqrt(N), nprobe
   calibrated to recall@10 >= 0.95 on 1000 corpus chunks), on CPU: train / add / merge /
   calibrate seconds.
5. queries: --queries chunks of the val split (documents that are not in the index) embedded with
   the corpus's embedder and searched with the built index, k=10, all at once, best of --repeats
   (fewer once the searches took 10 s): queries/s at the calibrated nprobe, and recall@10 against
   exact search (``exact_top`` over all embeddings, streamed shard by shard); then the same for a
   few other nprobe values.
6. neighbours (--no-neighbours skips it): the ``retrieval neighbours`` job (k=2) on a token
   dataset of the val documents alone: windows/s, with and without its start-up (loading the
   index and every corpus chunk's tokens).

Embeddings, index and neighbours are rebuilt on every run (they are what is measured); the corpus
file, tokenizer and token dataset are reused. Everything runs on CPU; FAISS and numpy use all the
threads the machine line reports (set OMP_NUM_THREADS to change FAISS's). Disk at 1M chunks: about
0.25 GB corpus, 0.2 GB tokens, 1.3 GB embeddings, 2 GB index (parts and merged); memory: a few GB
(the merged index is 1 GB at 1M x 256 float32). Not a test: run it by hand.

    python benchmarks/bench_retrieval.py                   # ~1M chunks: some 15 minutes on 2 cores
    python benchmarks/bench_retrieval.py --chunks 30000    # a quick check: about a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep.chunks import (  # noqa: E402
    DocumentChunker,
    EmbedConfig,
    EmbeddingsManifest,
    embed_corpus,
    retrieval_root,
    stream_tokens,
)
from data_prep.corpus import CorpusConfig, seeded_permutation  # noqa: E402
from data_prep.embedding import make_embedder  # noqa: E402
from data_prep.faiss_index import (  # noqa: E402
    RECALL_AT,
    IndexConfig,
    build_index,
    exact_top,
    import_faiss,
    load_index,
    recall_at,
    set_nprobe,
)
from data_prep.retrieval import Corpus, NeighboursConfig, find_neighbours  # noqa: E402
from data_prep.shards import ShardsConfig, write_shards  # noqa: E402
from data_prep.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402
from zarvan_dist.data.reader import WindowReader  # noqa: E402
from zarvan_dist.tokenizer import load_tokenizer  # noqa: E402

TOKENIZER = ROOT / "data" / "quickstart-tokenizer.model"
# Chunks the planned prefix of documents is expected to give, over the request: the estimate
# from bytes per token is a few per cent off either way, and too few costs a second shards run.
_MARGIN = 1.02
# Queries per exact_top call: its per-block buffers are queries x 16384 scores (float32, int64),
# about 0.2 GB per 1000 queries.
_EXACT_BATCH = 1000
_LONG_SEARCH_S = 10.0


def default_inputs() -> list[str]:
    """The standard library directory and this interpreter's site-packages (both, when distinct)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["stdlib"], paths["purelib"], paths["platlib"]]))


def source_files(inputs: list[str], extensions: list[str]) -> list[str]:
    """Files under ``inputs`` (directories, walked in sorted order) ending in ``extensions``, each real file once."""
    out, seen = [], set()
    for top in inputs:
        for directory, subdirs, names in os.walk(top):
            subdirs.sort()
            for name in sorted(names):
                path = os.path.realpath(os.path.join(directory, name))
                if name.endswith(tuple(extensions)) and path not in seen and os.path.isfile(path):
                    seen.add(path)
                    out.append(path)
    return out


def write_corpus(jsonl: Path, inputs: list[str], extensions: list[str], seed: int) -> dict:
    """Write the distinct non-empty text files under ``inputs`` as JSON lines ({"text", "source"}) in
    seeded order, and beside it (``.npz``) each line's UTF-8 size and split key (the first 8 bytes of
    the text's sha256, as the shards job reads them). Returns files seen, documents, bytes."""
    files = source_files(inputs, extensions)
    lines, sizes, keys, seen = [], [], [], set()
    for path in files:
        data = Path(path).read_bytes()
        if not data or b"\0" in data:  # what the corpus reader skips as empty or binary
            continue
        text = data.decode("utf-8", "replace")
        utf8 = text.encode("utf-8")
        sha = hashlib.sha256(utf8).digest()
        if sha in seen:
            continue
        seen.add(sha)
        lines.append(json.dumps({"text": text, "source": path}) + "\n")
        sizes.append(len(utf8))
        keys.append(int.from_bytes(sha[:8], "big"))
    if not lines:
        raise SystemExit(f"no {' '.join(extensions)} files under {' '.join(inputs)}")
    order = seeded_permutation(len(lines), seed)
    tmp = jsonl.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines[i] for i in order)
    np.savez(jsonl.with_suffix(".npz"), bytes=np.array(sizes, np.int64)[order],
             key=np.array(keys, np.uint64)[order])
    os.replace(tmp, jsonl)
    return {"files": len(files), "documents": len(lines), "bytes": int(sum(sizes))}


def tokens_per_byte(jsonl: Path, tokenizer: str, sample_bytes: int = 4_000_000) -> float:
    """Tokens (BOS included) per UTF-8 byte over the corpus's first documents (a random sample)."""
    sp = load_tokenizer(tokenizer).processor
    texts, size = [], 0
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode("utf-8"))
            if size >= sample_bytes:
                break
    ids = sp.encode(texts, add_bos=True, num_threads=os.cpu_count() or 1)
    return sum(map(len, ids)) / size


def plan_max_docs(meta: dict, per_byte: float, val_fraction: float, target: float, m: int) -> int | None:
    """The fewest leading documents whose train documents are estimated to cut into ``target``
    chunks of m tokens (a document of n tokens gives ceil(n / m)); None when all are needed."""
    est = np.ceil((meta["bytes"] * per_byte) / m)
    train = meta["key"].astype(np.float64) >= val_fraction * 2.0**64
    cum = np.cumsum(est * train)
    k = int(np.searchsorted(cum, target))
    return k + 1 if k < len(cum) else None


def count_chunks(reader: WindowReader, split: str, m: int) -> int:
    """Document-aligned chunks of m tokens in ``split`` (what the embed job will cut): sum of ceil(length / m)."""
    bos, pos, starts = reader.manifest.bos_id, 0, []
    for block in stream_tokens(reader, split):
        starts.append(pos + np.flatnonzero(block == bos))
        pos += len(block)
    if not starts:
        return 0
    starts = np.concatenate(starts)
    return int((-(-np.diff(np.append(starts, pos)) // m)).sum())


def val_query_chunks(reader: WindowReader, m: int, n: int, seed: int) -> tuple[np.ndarray, int]:
    """A seeded sample of n of the val split's document-aligned chunks ([n, m] int32), and how many there are."""
    chunker = DocumentChunker(m, reader.manifest.bos_id)
    parts = [chunker.feed(block).tokens for block in stream_tokens(reader, "val")]
    chunks = np.concatenate([*parts, chunker.finish().tokens])
    if n >= len(chunks):
        return chunks, len(chunks)
    return chunks[np.sort(np.random.default_rng(seed).choice(len(chunks), n, replace=False))], len(chunks)


def time_search(searcher, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall seconds of up to ``repeats`` searches of all ``queries`` at once, and the ids [Q, k] found.

    Repeats stop once the searches took ``_LONG_SEARCH_S``: so long a search averages out noise
    by itself, and repeating the slow rows of the nprobe table would dominate a 1M-chunk run.
    """
    best, ids, spent = float("inf"), None, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = searcher.search(queries, k)
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
        if spent >= _LONG_SEARCH_S:
            break
    return best, ids


def build_dataset(args: argparse.Namespace, jsonl: Path, meta: dict, tokenizer: str, val_fraction: float,
                  out: Path) -> tuple[dict, int, int | None]:
    """The token dataset whose train split cuts into at least ``args.chunks`` chunks (or the whole
    corpus when it holds fewer). Returns the last shards summary, the train chunks and ``max_docs``."""
    settings = {"corpus": jsonl.name, "chunks": args.chunks, "chunk_len": args.chunk_len, "seq_len": args.seq_len,
                "val_fraction": val_fraction,
                "tokenizer_sha256": hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()}
    plan_path = out.parent / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    target, per_byte = args.chunks * _MARGIN, None
    if plan.get("settings") == settings:
        max_docs = plan["max_docs"]
    else:
        per_byte = tokens_per_byte(jsonl, tokenizer)
        max_docs = plan_max_docs(meta, per_byte, val_fraction, target, args.chunk_len)
        print(f"plan: {per_byte:.3f} tokens per byte on a sample; max_docs {max_docs or 'all'} "
              f"of {len(meta['bytes']):,} documents for ~{target:,.0f} train chunks", flush=True)
    while True:
        cfg = ShardsConfig(tokenizer=tokenizer, out=str(out), seq_len=args.seq_len, workers=args.workers,
                           val_fraction=val_fraction, overwrite=True,
                           corpus=CorpusConfig(inputs=[str(jsonl)], max_docs=max_docs))
        s = write_shards(cfg, progress=args.progress)
        got = count_chunks(WindowReader(str(out)), "train", args.chunk_len)
        if got >= args.chunks or max_docs is None:
            break
        target *= args.chunks / got * _MARGIN
        per_byte = per_byte or tokens_per_byte(jsonl, tokenizer)
        more = plan_max_docs(meta, per_byte, val_fraction, target, args.chunk_len)
        max_docs = None if more is None else max(more, max_docs + max_docs // 50 + 1)
        print(f"plan: {got:,} train chunks < {args.chunks:,}; again with max_docs {max_docs or 'all'}", flush=True)
    plan_path.write_text(json.dumps({"settings": settings, "max_docs": max_docs}, indent=1) + "\n")
    if got < args.chunks:
        print(f"warning: the whole corpus cuts into only {got:,} train chunks (< --chunks {args.chunks:,}); "
              f"add sources with --input", flush=True)
    return s, got, max_docs


def val_documents_dataset(args: argparse.Namespace, dataset: Path, jsonl: Path, tokenizer: str, out: Path) -> dict:
    """A token dataset (train split only) of the main dataset's val documents, in their val order."""
    wanted = []  # the byte offset of each val document's line in the JSON-lines corpus
    with open(dataset / "val" / "documents.jsonl", encoding="utf-8") as f:
        for line in f:
            wanted.append(json.loads(line)["offset"])
    rows = []
    with open(jsonl, "rb") as f:
        for offset in wanted:
            f.seek(offset)
            rows.append(f.readline().decode("utf-8"))
    docs = out.parent / "val-documents.jsonl"
    text = "".join(rows)
    if not docs.exists() or docs.read_text(encoding="utf-8") != text:
        docs.write_text(text, encoding="utf-8")
    cfg = ShardsConfig(tokenizer=tokenizer, out=str(out), seq_len=args.seq_len, workers=args.workers,
                       val_fraction=0.0, overwrite=True, corpus=CorpusConfig(inputs=[str(docs)]))
    return write_shards(cfg, progress=args.progress)


def machine_line() -> str:
    """CPU, cores, RAM and the thread counts of FAISS and torch: what the figures depend on."""
    import torch

    faiss = import_faiss()
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    model = names[0] if names else platform.processor() or "unknown cpu"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
    return (f"machine: {model}; {os.cpu_count()} cores ({usable} usable), {ram:.0f} GiB RAM; faiss {faiss.__version__} "
            f"omp threads {faiss.omp_get_max_threads()}, torch threads {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=1_000_000,
                   help="corpus chunks to index, at least (default: 1000000; the actual count is printed)")
    p.add_argument("--queries", type=int, default=5000,
                   help="held-out val chunks searched for throughput and recall (default: 5000; fewer when "
                        "the val split holds fewer)")
    p.add_argument("--chunk-len", type=int, default=64, help="m, tokens per chunk (default: 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window of the token dataset (default: 256)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="documents sent to the val split, whose chunks are the queries (default: 2 x queries / "
                        "chunks, within [0.01, 0.25]: 0.01 at 1M chunks)")
    p.add_argument("--input", nargs="+", default=None, metavar="DIR",
                   help="directories of source files (default: this Python's standard library directory and "
                        "its site-packages)")
    p.add_argument("--extensions", nargs="+", default=[".py"], metavar="SUFFIX",
                   help="file suffixes taken (default: .py)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help=f"sentencepiece model (default: {TOKENIZER.relative_to(ROOT)}, or a 4096-piece one "
                        f"trained on the standard library into WORK when that is missing)")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_retrieval",
                   help="directory of the corpus, token dataset, embeddings and index (default: "
                        ".cache/bench_retrieval)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes of the shards job (default: all cores)")
    p.add_argument("--nprobes", type=int, nargs="+", default=None, metavar="N",
                   help="nprobe values of the recall/throughput table (default: powers of two up to 256, "
                        "at most nlist, and the calibrated one)")
    p.add_argument("--repeats", type=int, default=3,
                   help="searches of each timing, the best kept; fewer once they took 10 s (default: 3)")
    p.add_argument("--no-neighbours", dest="neighbours", action="store_false",
                   help="skip the neighbours job on the val documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus order and the query sample (default: 0)")
    p.add_argument("--progress", action="store_true", help="show the jobs' progress bars")
    args = p.parse_args()
    if args.chunks < 100 or args.queries < 1:
        p.error("--chunks must be at least 100 and --queries positive")
    start = time.perf_counter()
    print(machine_line(), flush=True)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    faiss = import_faiss()

    # 1. corpus
    inputs = [os.path.realpath(d) for d in (args.input or default_inputs())]
    key = hashlib.sha256(json.dumps([inputs, args.extensions, args.seed]).encode()).hexdigest()[:12]
    jsonl = work / f"corpus-{key}.jsonl"
    t = time.perf_counter()
    if jsonl.exists() and jsonl.with_suffix(".npz").exists():
        how = "reused"
    else:
        c = write_corpus(jsonl, inputs, args.extensions, args.seed)
        how = f"written from {c['files']:,} files in {time.perf_counter() - t:.1f} s"
    with np.load(jsonl.with_suffix(".npz")) as z:
        meta = {k: z[k] for k in z.files}
    print(f"corpus: {len(meta['bytes']):,} distinct {'/'.join(args.extensions)} files, "
          f"{meta['bytes'].sum() / 1e6:,.0f} MB under {' '.join(inputs)}; {jsonl} ({how})", flush=True)

    # 2. tokens
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(TOKENIZER)
        if not TOKENIZER.exists():
            tokenizer = str(work / "tokenizer.model")
            if not Path(tokenizer).exists():
                s = train_tokenizer(TokenizerConfig(out=tokenizer, vocab_size=4096,
                                                    threads=min(os.cpu_count() or 1, 4)), progress=args.progress)
                print(f"tokenizer: trained bpe {s['vocab_size']} in {s['seconds']:.1f} s: {tokenizer}", flush=True)
    val_fraction = args.val_fraction if args.val_fraction is not None else \
        min(0.25, max(0.01, 2 * args.queries / args.chunks))
    run_dir = work / f"chunks-{args.chunks}"
    dataset = run_dir / "dataset"
    s, train_chunks, max_docs = build_dataset(args, jsonl, meta, tokenizer, val_fraction, dataset)
    tr, va = s["splits"]["train"], s["splits"]["val"]
    how = "reused" if s["tokens_encoded"] == 0 else \
        f"{s['tokens_encoded'] / s['seconds']:,.0f} tokens/s with {args.workers} workers"
    print(f"tokens: {tr['documents']:,} train / {va['documents']:,} val documents (max_docs {max_docs or 'all'}, "
          f"val_fraction {val_fraction:g}), {tr['tokens']:,} / {va['tokens']:,} tokens, seq_len {args.seq_len}, "
          f"tokenizer {tokenizer}; shards job {s['seconds']:.1f} s ({how}); {dataset}", flush=True)

    # 3. embed
    retrieval = retrieval_root(str(dataset))
    shutil.rmtree(retrieval, ignore_errors=True)  # derived, and a finished job would only be checked, not timed
    e = embed_corpus(EmbedConfig(corpus=str(dataset), chunk_len=args.chunk_len), progress=args.progress)
    emb_root = f"{retrieval}/embeddings"
    emb = EmbeddingsManifest.load(emb_root)
    print(f"embed: {e['chunks']:,} chunks of {args.chunk_len} tokens (requested {args.chunks:,}) x {e['dim']} in "
          f"{e['seconds']:.1f} s = {e['chunks_per_s']:,.0f} chunks/s ({emb.embedder['kind']} embedder, "
          f"{e['shards']} shards, {sum(sh.bytes for sh in emb.shards) / 2**30:.2f} GiB)", flush=True)
    if e["chunks"] != train_chunks:
        raise SystemExit(f"the embed job cut {e['chunks']} chunks, count_chunks said {train_chunks}")

    # 4. index
    idx = build_index(retrieval, IndexConfig(device="cpu"), progress=args.progress)
    sec = idx.seconds
    print(f"index: {idx.kind} nlist {idx.nlist}, trained on {idx.train_size:,}, {idx.index_bytes / 2**30:.2f} GiB; "
          f"seconds: train {sec['train']:.1f}, add {sec['add']:.1f}, merge {sec['merge']:.1f}, "
          f"calibrate {sec['calibrate']:.1f} (total {sum(sec.values()):.1f}); calibrated nprobe {idx.nprobe} "
          f"(recall@{RECALL_AT} {idx.recall_at_10:.3f} on {idx.calibration_queries} corpus chunks)", flush=True)

    # 5. held-out queries
    reader = WindowReader(str(dataset))
    chunks, val_chunks = val_query_chunks(reader, args.chunk_len, args.queries, args.seed)
    embedder = make_embedder(emb.embedder)
    t = time.perf_counter()
    queries = embedder.embed(chunks)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    searcher, summary = load_index(retrieval)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    exact_s, exact_i = zip(*(exact_top(emb_root, emb, queries[a:a + _EXACT_BATCH], None, 4 * RECALL_AT)
                             for a in range(0, len(queries), _EXACT_BATCH)))
    exact_s, exact_i = np.concatenate(exact_s), np.concatenate(exact_i)
    exact_t = time.perf_counter() - t
    print(f"queries: {len(queries):,} of the {val_chunks:,} val chunks (documents not in the index), embedded at "
          f"{len(queries) / embed_s:,.0f} chunks/s; exact top-{4 * RECALL_AT} over all {emb.chunks:,} embeddings "
          f"(numpy, streamed) {exact_t:.1f} s = {len(queries) / exact_t:,.0f} queries/s; index loaded in "
          f"{load_s:.1f} s", flush=True)
    calibrated = summary["nprobe"]
    nprobes = sorted({calibrated, *(args.nprobes or [n for n in (2 ** e for e in range(9)) if n <= idx.nlist])})
    rows = {}
    for nprobe in nprobes:
        set_nprobe(searcher, nprobe)
        seconds, found = time_search(searcher, queries, RECALL_AT, args.repeats)
        rows[nprobe] = (len(queries) / seconds, recall_at(found, exact_s, exact_i))
    qps, recall = rows[calibrated]
    print(f"search: {qps:,.0f} queries/s at the calibrated nprobe {calibrated} (k={RECALL_AT}, {len(queries):,} "
          f"queries per call, best of up to {args.repeats}); held-out recall@{RECALL_AT} {recall:.3f} against exact "
          f"search")
    print(f"{'nprobe':>8}{'queries/s':>12}{f'recall@{RECALL_AT}':>11}")
    for nprobe, (q, r) in rows.items():
        print(f"{nprobe:>8}{q:>12,.0f}{r:>11.3f}{'   <- calibrated' if nprobe == calibrated else ''}")
    sys.stdout.flush()
    del searcher

    # 6. neighbours of the val documents
    if args.neighbours:
        # the job's start-up, timed apart so that the per-window rate can leave it out: loading the
        # index (timed above) and every corpus chunk's tokens, a fixed cost a full split amortises
        t = time.perf_counter()
        Corpus(emb_root, emb, progress=False)
        corpus_s = time.perf_counter() - t
        vd = val_documents_dataset(args, dataset, jsonl, tokenizer, run_dir / "val-documents")
        out = run_dir / "val-documents-neighbours"
        shutil.rmtree(out, ignore_errors=True)
        n = find_neighbours(NeighboursConfig(dataset=str(run_dir / "val-documents"), retrieval=retrieval, out=str(out),
                                             chunk_len=args.chunk_len, device="cpu"), progress=args.progress)
        windows = n["splits"]["train"]["windows"]
        per_window = -(-args.seq_len // args.chunk_len)
        steady = n["seconds"] - load_s - corpus_s
        print(f"neighbours: k=2, nprobe {n['nprobe']}, {windows:,} windows ({windows * per_window:,} query chunks) "
              f"of the {vd['splits']['train']['documents']:,} val documents in {n['seconds']:.1f} s = "
              f"{windows / n['seconds']:,.0f} windows/s; without its start-up (~{load_s + corpus_s:.1f} s: index "
              f"{load_s:.1f}, corpus chunks {corpus_s:.1f}, timed apart) ~{windows / max(steady, 1e-9):,.0f} windows/s",
              flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}; faiss omp threads {faiss.omp_get_max_threads()}; "
          f"bench finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
