"""Command line of the data jobs: ``python -m data_prep {tokenizer,shards,verify,inspect,retrieval} --help``."""

from __future__ import annotations

import argparse
import sys

from data_prep import DataPrepError
from data_prep.corpus import DEFAULT_EXTENSIONS, CorpusConfig, CorpusStats
from data_prep.chunks import EmbedConfig, embed_corpus
from data_prep.faiss_index import IndexConfig, build_index
from data_prep.inspection import describe_dataset, show_window
from data_prep.retrieval import NeighboursConfig, find_neighbours
from data_prep.shards import ShardsConfig, merge, parse_task_range, write_shards
from data_prep.tokenizer import TRAIN_THREADS, TokenizerConfig, train_tokenizer
from data_prep.verify import verify_dataset
from zarvan_dist.config import ConfigError
from zarvan_dist.data.manifest import SPLITS
from zarvan_dist.data.reader import WindowReader
from zarvan_dist.data.shards import DatasetError
from zarvan_dist.tokenizer import TokenizerError


def _corpus_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("corpus")
    g.add_argument("--input", nargs="+", default=[], metavar="URL",
                   help="fsspec URLs, globs or directories (/data, file:///data/*.txt, memory://c, "
                        "s3://bucket/prefix). JSON lines (.jsonl, .json, .jsonl.gz, .jsonl.zst, .json.zst): one "
                        "document per line; .parquet: one per row of --text-field; any other file: one "
                        "document. Default: this Python's standard library *.py files")
    g.add_argument("--text-field", default="text",
                   help="JSON field or parquet column holding the text (default: text)")
    g.add_argument("--extensions", nargs="+", default=DEFAULT_EXTENSIONS, metavar="SUFFIX",
                   help="suffixes taken when walking a directory (explicit files and glob matches are "
                        "always taken; default: common text and code suffixes)")
    g.add_argument("--max-docs", type=int, default=None, help="stop after this many documents, in reading order (shards: after the piece shuffle; one task only)")
    g.add_argument("--skip-bad-json", action="store_true",
                   help="skip and count malformed JSON lines instead of stopping at the first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _corpus(args: argparse.Namespace) -> CorpusConfig:
    return CorpusConfig(inputs=args.input, text_field=args.text_field, extensions=args.extensions,
                        max_docs=args.max_docs, skip_bad_json=args.skip_bad_json)


def _print_corpus(stats: CorpusStats) -> None:
    skipped = ", ".join(f"{reason} {n}" for reason, n in stats.skipped.items()) or "none"
    print(f"corpus: {stats.description}")
    print(f"  {stats.files} files read, {stats.documents} documents; skipped: {skipped}")
    print(f"  undecodable: {stats.undecodable_sequences} byte sequences replaced with U+FFFD "
          f"in {stats.undecodable_documents} documents")


def run_tokenizer(args: argparse.Namespace) -> None:
    cfg = TokenizerConfig(out=args.out, vocab_size=args.vocab_size, corpus=_corpus(args),
                          model_type=args.model_type, seed=args.seed, sample_bytes=args.sample_bytes,
                          threads=args.threads)
    s = train_tokenizer(cfg, progress=not args.quiet)
    _print_corpus(s["corpus"])
    print(f"trained {s['model_type']} vocab {s['vocab_size']} on {s['sample_documents']} documents "
          f"({s['sample_bytes']:,} bytes) in {s['seconds']:.1f} s")
    print(f"wrote {s['out']} sha256 {s['sha256']}")


def run_shards(args: argparse.Namespace) -> None:
    cfg = ShardsConfig(tokenizer=args.tokenizer, out=args.out, seq_len=args.seq_len, corpus=_corpus(args),
                       workers=args.workers, seed=args.seed, val_fraction=args.val_fraction,
                       windows_per_shard=args.windows_per_shard, num_tasks=args.num_tasks,
                       shuffle_buffer=args.shuffle_buffer, piece_bytes=args.piece_mb << 20, overwrite=args.overwrite)
    tasks = parse_task_range(args.tasks, cfg.num_tasks) if args.tasks else None
    s = write_shards(cfg, tasks, progress=not args.quiet)
    kept = [t for t, what in s["tasks"].items() if what == "kept"]
    print(f"tasks: {len(s['tasks']) - len(kept)} written, {len(kept)} kept from an earlier run "
          f"(of {cfg.num_tasks}); encoded {s['tokens_encoded']:,} tokens in {s['seconds']:.1f} s "
          f"({s['tokens_encoded'] / s['seconds']:,.0f} tokens/s) with {cfg.workers} worker(s) per task")
    if tasks is None:
        _print_merge(s)
    else:
        print(f"merge when every task has run: python -m data_prep merge --out {cfg.out}")


def run_merge(args: argparse.Namespace) -> None:
    _print_merge(merge(args.out))


def _print_merge(s: dict) -> None:
    _print_corpus(s["corpus"])
    print(f"{'split':<8}{'documents':>12}{'tokens':>16}{'windows':>12}{'shards':>8}{'tail dropped':>14}")
    for name in SPLITS:
        t = s["splits"][name]
        print(f"{name:<8}{t['documents']:>12,}{t['tokens']:>16,}{t['windows']:>12,}{t['shards']:>8}"
              f"{t['tail_tokens']:>14}")
    print(f"wrote {s['output'].rstrip('/')}/manifest.json")


def run_verify(args: argparse.Namespace) -> None:
    t = verify_dataset(args.dir, progress=not args.quiet)
    print(f"ok: {t['shards']} shards, {t['windows']:,} windows, {t['tokens']:,} tokens, "
          f"{t['bytes']:,} bytes match the manifest")


def run_inspect(args: argparse.Namespace) -> None:
    reader = WindowReader(args.dir)
    print(describe_dataset(reader))
    print(show_window(reader, args.split, args.window, ids=args.ids))


def run_embed(args: argparse.Namespace) -> None:
    cfg = EmbedConfig(corpus=args.corpus, out=args.out, split=args.split, chunk_len=args.chunk_len,
                      embedder=args.embedder, dim=args.dim, chunks_per_shard=args.chunks_per_shard,
                      device=args.device, overwrite=args.overwrite)
    s = embed_corpus(cfg, progress=not args.quiet)
    print(f"embedded {s['embedded']:,} chunks ({s['kept_shards']} of {s['shards']} shards kept from an earlier "
          f"run) in {s['seconds']:.1f} s: {s['chunks_per_s']:,.0f} chunks/s; {s['chunks']:,} chunks x {s['dim']} "
          f"in {cfg.out}")


def run_index(args: argparse.Namespace) -> None:
    overrides = {"kind": args.kind, "nlist": args.nlist, "nprobe": args.nprobe, "target_recall": args.target_recall,
                 "seed": args.seed, "device": args.device}
    cfg = IndexConfig.from_file(args.config, **overrides) if args.config else \
        IndexConfig(**{k: v for k, v in overrides.items() if v is not None})
    s = build_index(args.retrieval, cfg, progress=not args.quiet)
    recall = "n/a" if s.recall_at_10 is None else f"{s.recall_at_10:.3f}"
    print(f"{s.kind} index of {s.ntotal:,} x {s.dim} (nlist {s.nlist}, nprobe {s.nprobe}) on {s.device}: "
          f"recall@10 {recall} on {s.calibration_queries} held-out queries; "
          f"{s.index_bytes / 2**20:.1f} MiB; seconds {s.seconds}")


def run_neighbours(args: argparse.Namespace) -> None:
    cfg = NeighboursConfig(dataset=args.dataset, retrieval=args.retrieval, out=args.out, chunk_len=args.chunk_len,
                           k=args.k, nprobe=args.nprobe, device=args.device, overwrite=args.overwrite)
    s = find_neighbours(cfg, progress=not args.quiet)
    for name, t in s["splits"].items():
        print(f"{name}: {t['windows']:,} windows, {t['shards']} shards ({t['kept_shards']} kept from an earlier run)")
    print(f"wrote {s['out']} (nprobe {s['nprobe']}, {s['device']}) in {s['seconds']:.1f} s")


def _retrieval_parser(jobs) -> None:
    p = jobs.add_parser(
        "retrieval", help="embed corpus chunks, build a FAISS index, find every window chunk's neighbours",
        description="RETRO-style retrieval, offline: `embed` cuts a dataset's split into document-aligned "
                    "chunks and embeds them, `index` builds a FAISS index over the embeddings, `neighbours` "
                    "writes the nearest corpus chunks of every chunk of every window beside the token shards. "
                    "Every job resumes after a kill.",
    )
    sub = p.add_subparsers(dest="retrieval_job", required=True, metavar="STEP")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto (default): CUDA when present (faiss-gpu for FAISS), else CPU")

    e = sub.add_parser(
        "embed", parents=[quiet, device], help="cut a split into chunks of m tokens and embed them",
        description="Cut CORPUS's split into chunks of m tokens aligned to documents (a document's last chunk may "
                    "be shorter) and write OUT/shard-NNNNNN.npz (embeddings, tokens, documents) and "
                    "OUT/embeddings.json. Re-running after a kill resumes and ends byte-identical.",
    )
    e.add_argument("corpus", metavar="CORPUS", help="fsspec URL of a token dataset (directory or manifest.json)")
    e.add_argument("--out", default=None, metavar="DIR", help="embeddings directory (default: CORPUS/retrieval/embeddings)")
    e.add_argument("--split", choices=SPLITS, default="train", help="split to embed (default: train)")
    e.add_argument("--chunk-len", type=int, default=64, help="m, tokens per corpus chunk (default: 64)")
    e.add_argument("--embedder", default="hashed",
                   help="hashed (default: model-free hashed unigram+bigram counts through a fixed random "
                        "projection) or checkpoint:PATH (mean final hidden state of a trained checkpoint)")
    e.add_argument("--dim", type=int, default=256, help="width of the hashed embedding (default: 256)")
    e.add_argument("--chunks-per-shard", type=int, default=65536, help="chunks per shard (default: 65536)")
    e.add_argument("--overwrite", action="store_true", help="replace embeddings of another configuration in OUT")
    e.set_defaults(run=run_embed)

    i = sub.add_parser(
        "index", parents=[quiet, device], help="train and fill a FAISS index over the embeddings",
        description="Train an IVF (flat or PQ lists) or flat FAISS index on a sample of RETRIEVAL/embeddings, add "
                    "each shard to a copy of it, merge the copies and calibrate nprobe on held-out queries "
                    "against exact search; writes RETRIEVAL/index/index.faiss and index.json.",
    )
    i.add_argument("retrieval", metavar="RETRIEVAL", help="directory holding embeddings/ (e.g. DATA/retrieval)")
    i.add_argument("--config", default=None, metavar="YAML", help="index settings (keys of IndexConfig, e.g. "
                   "configs/retrieval/ivf_flat.yaml); the flags below override it")
    i.add_argument("--kind", choices=["ivf_flat", "ivf_pq", "flat"], default=None, help="index type (default: ivf_flat)")
    i.add_argument("--nlist", type=int, default=None, help="inverted lists (default: 4 sqrt(chunks))")
    i.add_argument("--nprobe", type=int, default=None,
                   help="lists searched per query (default: calibrated to reach --target-recall)")
    i.add_argument("--target-recall", type=float, default=None, help="recall@10 to calibrate nprobe to (default: 0.95)")
    i.add_argument("--seed", type=int, default=None, help="seed of sampling and k-means (default: 0)")
    i.set_defaults(run=run_index)

    n = sub.add_parser(
        "neighbours", parents=[quiet, device], help="the k nearest corpus chunks of every window chunk",
        description="For every chunk of C tokens of every train and val window of DATASET, the k nearest corpus "
                    "chunks from other documents, stored as tokens (chunk + continuation) with distances in "
                    "sidecar shards OUT/{train,val}/shard-NNNNNN.tar keyed like the token shards, and "
                    "OUT/neighbours.json. Train with `data.neighbours: OUT`.",
    )
    n.add_argument("dataset", metavar="DATASET", help="fsspec URL of the token dataset")
    n.add_argument("--retrieval", default=None, metavar="DIR", help="embeddings/ and index/ (default: DATASET/retrieval)")
    n.add_argument("--out", default=None, metavar="DIR", help="sidecar directory (default: DATASET/retrieval/neighbours)")
    n.add_argument("--chunk-len", type=int, default=64, help="C, tokens per window chunk: the model's supervisor_chunk "
                   "(default: 64)")
    n.add_argument("--k", type=int, default=2, help="neighbours per chunk (default: 2)")
    n.add_argument("--nprobe", type=int, default=None, help="lists searched (default: index.json's calibrated value)")
    n.add_argument("--overwrite", action="store_true", help="replace neighbours of another configuration in OUT")
    n.set_defaults(run=run_neighbours)


def build_parser() -> argparse.ArgumentParser:
    """The ``data_prep`` argument parser, one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Offline data jobs: train a tokenizer, write token shards, verify and inspect them, "
                    "and build retrieval neighbours.",
    )
    jobs = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    corpus = _corpus_parser()

    p = jobs.add_parser(
        "tokenizer", parents=[corpus], help="train a sentencepiece tokenizer",
        description="Train a lossless sentencepiece model (identity normalisation, whitespace kept, "
                    "byte fallback; UNK 0, BOS 1, EOS 2, PAD 3) on a seeded sample of the corpus.",
    )
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (> 260: 256 byte pieces + 4 specials)")
    p.add_argument("--out", required=True, metavar="PATH", help="fsspec URL of the model, e.g. data/tokenizer.model")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="algorithm (default: bpe)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample (default: 0)")
    p.add_argument("--sample-bytes", type=int, default=100_000_000,
                   help="bytes of text to train on, whole documents in seeded order (default: 1e8)")
    p.add_argument("--threads", type=int, default=TRAIN_THREADS,
                   help=f"training threads (default: {TRAIN_THREADS} on every machine: the trained model "
                        f"depends on this number, so keep it to reproduce a model)")
    p.set_defaults(run=run_tokenizer)

    p = jobs.add_parser(
        "shards", parents=[corpus], help="tokenize the corpus into WebDataset shards",
        description="Cut the inputs into pieces, shuffle them with a seed and deal them to --num-tasks tasks. "
                    "Each task streams its documents through a shuffle buffer, splits train/val by a hash of "
                    "each document, tokenizes in --workers processes and writes "
                    "DIR/tasks/TTTTT/{train,val}/shard-NNNNNN.tar (one window of seq_len + 1 tokens and its "
                    "CRC-32 per sample), its documents lists and, last, its task.json. Without --tasks every "
                    "task runs, then the merge writes DIR/{train,val}/documents.jsonl, DIR/tokenizer.model "
                    "and, last, DIR/manifest.json. With --tasks A-B only those tasks run (another machine may "
                    "run others into the same DIR); then `python -m data_prep merge --out DIR`. Re-running "
                    "keeps finished tasks and writes the others again: the same bytes as an uninterrupted run.",
    )
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="fsspec URL of the sentencepiece model")
    p.add_argument("--out", required=True, metavar="DIR", help="fsspec URL of the dataset directory")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training window (a sample holds seq_len + 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes per task (default: 1; output does not depend on it)")
    p.add_argument("--num-tasks", type=int, default=1,
                   help="tasks the job is split into (default: 1); the output depends on it, not on where or in "
                        "which order the tasks run")
    p.add_argument("--tasks", default=None, metavar="A-B",
                   help="run only tasks A..B (inclusive, 0-based; or one task A) and do not merge (default: all, "
                        "then merge)")
    p.add_argument("--seed", type=int, default=0, help="seed of the piece and document shuffles (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="expected fraction of documents in val, 0 for none (default: 0.01)")
    p.add_argument("--windows-per-shard", type=int, default=None,
                   help="windows per shard (default: about 2**25 tokens per shard)")
    p.add_argument("--shuffle-buffer", type=int, default=4096,
                   help="documents each task holds to shuffle its stream (default: 4096; 0: input order)")
    p.add_argument("--piece-mb", type=int, default=256,
                   help="large inputs are cut into pieces of about this many MiB (default: 256)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset or tasks of another configuration in DIR")
    p.set_defaults(run=run_shards)

    p = jobs.add_parser(
        "merge", help="merge the finished tasks of a shards job into its manifest",
        description="Check that every task of the shards job in DIR has finished (naming those that have not), "
                    "then write DIR/{train,val}/documents.jsonl, DIR/tokenizer.model and, last, "
                    "DIR/manifest.json listing every task's shards in task order.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="fsspec URL of the dataset directory")
    p.set_defaults(run=run_merge)

    p = jobs.add_parser(
        "verify", help="check every shard against the manifest",
        description="Check each shard's size, sha256, samples, window and token counts (and the "
                    "tokenizer copy and documents lists) against DIR/manifest.json; stop at the first "
                    "mismatch, naming the file, with exit status 1.",
    )
    p.add_argument("dir", metavar="DIR", help="fsspec URL of the dataset directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_verify)

    p = jobs.add_parser(
        "inspect", help="print manifest totals and decode a window",
        description="Print the dataset's totals and decode one window back to text (<s> marks a BOS).",
    )
    p.add_argument("dir", metavar="DIR", help="fsspec URL of the dataset directory")
    p.add_argument("--window", type=int, default=0, help="window to decode (default: 0)")
    p.add_argument("--ids", action="store_true", help="also print the window's token ids")
    p.add_argument("--split", choices=SPLITS, default="train", help="split of the window (default: train)")
    p.set_defaults(run=run_inspect)
    _retrieval_parser(jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one job; a job error prints ``error: ...`` and returns 1."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (DataPrepError, ConfigError, DatasetError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the system's own message names the file (no space, no permission, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
