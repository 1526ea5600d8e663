"""Evaluate a checkpoint: ``python -m pretrain.eval --checkpoint PATH [--split val | --text FILE ...]``.

**A split** (default ``val``): its windows are dealt to ``--rows`` lanes (as in training) and read in
order from each lane's start; a retrieval model reads the neighbours the run read (``data.neighbours``)
or those ``--neighbours`` names.

**Raw text** (``--text FILE_OR_URL ...``, fsspec URLs, globs or directories as ``data_prep`` reads them):
each file is one document (a JSON-lines file: one per line), encoded with the run's tokenizer (or
``--tokenizer``), led by BOS and cut into windows of the run's ``seq_len`` (or ``--seq-len``);
``--rows`` documents are read side by side, each from its own start.

The recurrent state is carried from window to window (``--no-carry``: reset before every window).

**A mixture** (a run with ``data.sources``): each source's split is evaluated on its own; the JSON then
has ``sources`` (name -> that source's figures) and ``loss`` / ``perplexity`` of the mean weighted by
the sources' weights. ``--source NAME`` evaluates that source alone (the JSON of one dataset, with
``source``).

**Bands.** The loss is also reported per band of target position: a target's position is its index
in its document (BOS at 0), i.e. the number of the document's tokens read when it is predicted; a
BOS target, which ends the document before it, counts as the position after that document's last
token. ``--bands`` sets the band edges (default 128, 512, 2k, 8k, ...: powers of 4; the last band
is open). A lane of a split mostly starts inside a document whose start it never read: the targets before
the lane's first BOS have no known position and are counted apart (``unknown_position``), not in
any band; the overall loss counts every target.

Prints one JSON object: checkpoint, step, split (null for text), loss (mean next-token
cross-entropy, nats), perplexity, tokens, windows, carry, bands (from, to (null: open), tokens, loss,
perplexity; bands past the last position read are left out), and unknown_position (a split) or
text, documents, seq_len (raw text). The same figures go to stderr as a table.
"""

from __future__ import annotations

import argparse
import math
import json
import sys

import numpy as np

from data_prep import DataPrepError
from data_prep.corpus import CorpusConfig, read_corpus
from zarvan_dist.config import ConfigError
from zarvan_dist.data import SPLITS, DatasetError, LaneLayout, Manifest
from zarvan_dist.tokenizer import BOS_ID, PAD_ID
from zarvan_dist.training.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from zarvan_dist.training.config import RunConfig, check_neighbours
from zarvan_dist.training.engines import autocast, resolve_device, resolve_dtype
from zarvan_dist.training.evaluate import DEFAULT_BAND_EDGES, Evaluator, mixture_loss

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20}


def parse_band_edges(text: str) -> list[int]:
    """``128,512,2k`` -> [128, 512, 2048] (k = 1024, M = 1024^2); a leading 0 may be given."""
    edges = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = _SUFFIXES.get(item[-1:], 1)
        try:
            edges.append(int(item[:-1] if scale > 1 else item) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated token counts "
                                             f"such as 128,512,2k") from None
    edges = edges[1:] if edges[:1] == [0] else edges
    if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: expected increasing positive edges such as 128,512,2k")
    return edges


def read_text_documents(inputs: list[str]) -> list[str]:
    """The documents of ``--text`` inputs in order; an input that gives none is a DataPrepError."""
    texts = []
    for url in inputs:
        try:
            docs, stats = read_corpus(CorpusConfig(inputs=[url]), progress=False)
        except DataPrepError as exc:
            raise DataPrepError(f"--text: {exc}") from None
        skipped = ", ".join(f"{n} {why}" for why, n in stats.skipped.items())
        if not docs:
            raise DataPrepError(f"--text: input {url}: no text to evaluate"
                                + (f" (skipped: {skipped})" if skipped else ""))
        if skipped:
            print(f"note: --text: input {url}: skipped {skipped}", file=sys.stderr)
        texts += [d.text for d in docs]
    return texts


def evaluate_split(checkpoint: Checkpoint, cfg: RunConfig, evaluator: Evaluator, split: str, rows: int, steps: int,
                   carry: bool, edges: list[int], url: str | None = None) -> dict:
    """``steps`` windows (0: all) of each of ``rows`` lanes of ``split`` of the dataset ``url`` (default
    ``cfg.data.dir``)."""
    url = url or cfg.data.dir
    manifest = Manifest.load(url)
    model_cfg = checkpoint.model_config
    if manifest.vocab_size != model_cfg.vocab_size:
        raise ConfigError(f"data.dir: the dataset {url} has vocab_size {manifest.vocab_size}, the model of "
                          f"{checkpoint.path} reads {model_cfg.vocab_size}: not a dataset of this model's tokenizer")
    check_neighbours(cfg, model_cfg, manifest)
    if model_cfg.arch == "nonattn" and model_cfg.retrieval and cfg.data.neighbours is None:
        print("note: the model reads retrieved text but no neighbours are given (data.neighbours unset or "
              "--neighbours none): it evaluates without retrieved text", file=sys.stderr)
    evaluator.bos_id = manifest.bos_id
    layout = LaneLayout(manifest.split(split).windows, rows)
    return evaluator.lanes(url, split, layout, steps=steps, carry=carry, edges=edges,
                           neighbours=cfg.data.neighbours)


def evaluate_text(checkpoint: Checkpoint, cfg: RunConfig, evaluator: Evaluator, inputs: list[str],
                  tokenizer: str | None, rows: int, seq_len: int | None, carry: bool, edges: list[int]) -> dict:
    """The documents of ``inputs`` (see ``read_text_documents``) encoded with ``tokenizer`` (None: the run's)."""
    texts = read_text_documents(inputs)
    tokens, lengths = checkpoint.tokenizer(tokenizer, cfg.data.dir).encode_documents(texts, "int64")
    documents = np.split(tokens, np.cumsum(lengths)[:-1])
    seq_len = seq_len or checkpoint.info.get("seq_len") or Manifest.load(cfg.data.dir).seq_len
    result = evaluator.documents(documents, rows, seq_len, PAD_ID, carry, edges)
    del result["unknown_position"]  # every document is read from its start
    return {**result, "text": inputs, "documents": len(documents), "seq_len": seq_len}


def format_table(result: dict) -> str:
    """The bands of an evaluation as an aligned text table."""
    lines = [f"{'position':<20} {'tokens':>12} {'loss':>8} {'perplexity':>12}"]

    def row(name: str, figures: dict) -> None:
        loss = "-" if figures["loss"] is None else f"{figures['loss']:.4f}"
        ppl = "-" if figures["perplexity"] is None else f"{figures['perplexity']:.2f}"
        lines.append(f"{name:<20} {figures['tokens']:>12,} {loss:>8} {ppl:>12}")

    for band in result["bands"]:
        row(f"[{_size(band['from'])}, {'inf' if band['to'] is None else _size(band['to'])})", band)
    if "unknown_position" in result:
        row("unknown (lane start)", result["unknown_position"])
    row("all", result)
    return "\n".join(lines)


def _size(n: int) -> str:
    for suffix, scale in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint directory, or a run directory / checkpoints root (its latest)")
    parser.add_argument("--split", choices=SPLITS, default=None, help="split to evaluate (default: val)")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE_OR_URL",
                        help="evaluate these text files instead of a split (each file one document)")
    parser.add_argument("--tokenizer", default=None, metavar="URL",
                        help="with --text: the sentencepiece model (default: the run's dataset's)")
    parser.add_argument("--seq-len", type=_positive, default=None,
                        help="with --text: tokens per window (default: the run's seq_len)")
    parser.add_argument("--rows", type=_positive, default=None,
                        help="lanes (or documents) read side by side (default: the run's eval.rows)")
    parser.add_argument("--steps", type=int, default=0,
                        help="windows per lane (default 0: every window of the lanes once)")
    parser.add_argument("--no-carry", dest="carry", action="store_false",
                        help="reset the recurrent state before every window (default: carry it)")
    parser.add_argument("--bands", type=parse_band_edges, default=DEFAULT_BAND_EDGES, metavar="EDGES",
                        help="band edges of target position, e.g. 128,512,2k (default: 128 x powers of 4)")
    parser.add_argument("--data-dir", default=None, metavar="URL",
                        help="dataset to read (default: the run's data.dir, or every source of a mixture)")
    parser.add_argument("--source", default=None, metavar="NAME",
                        help="a mixture run: evaluate this source alone (default: each source, and their weighted mean)")
    parser.add_argument("--neighbours", default=None, metavar="URL|none",
                        help="neighbour sidecar of the dataset for a retrieval model (default: the run's "
                             "data.neighbours); none: evaluate without retrieved text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    args = parser.parse_args(argv)
    if args.text is not None:
        given = [name for name, value in (("--split", args.split), ("--steps", args.steps),
                                          ("--neighbours", args.neighbours)) if value]
        if given:
            parser.error(f"{', '.join(given)}: a split's option, not for --text")
    elif args.tokenizer is not None or args.seq_len is not None:
        parser.error("--tokenizer and --seq-len go with --text")
    if args.source is not None and (args.text is not None or args.data_dir is not None):
        parser.error("--source picks a source of the run's mixture: not with --text or --data-dir")
    split = None if args.text is not None else args.split or "val"
    overrides = [f"data.dir={args.data_dir}", "data.sources=[]"] if args.data_dir else []
    if args.neighbours is not None or args.text is not None:  # raw text has no neighbours
        overrides.append(f"data.neighbours={'null' if args.neighbours in (None, 'none') else args.neighbours}")
    try:
        checkpoint = open_checkpoint(args.checkpoint)
        cfg = checkpoint.run_config(overrides)
        device = resolve_device(args.device)
        model = checkpoint.load_model(device)
        dtype = resolve_dtype(cfg.train.dtype, device)
        evaluator = Evaluator(model, device, BOS_ID, autocast=lambda: autocast(device, dtype))
        rows = args.rows or cfg.eval.rows
        if split is None:
            result = evaluate_text(checkpoint, cfg, evaluator, args.text, args.tokenizer, rows, args.seq_len,
                                   args.carry, args.bands)
        elif not cfg.data.sources:
            if args.source is not None:
                raise ConfigError(f"--source {args.source}: the run of {checkpoint.path} reads one dataset "
                                  f"(data.dir {cfg.data.dir}), not a mixture")
            result = evaluate_split(checkpoint, cfg, evaluator, split, rows, args.steps, args.carry, args.bands)
        else:
            names = [s.name for s in cfg.data.sources]
            if args.source is not None and args.source not in names:
                raise ConfigError(f"--source {args.source}: the run's sources are {', '.join(names)}")
            results = {s.name: evaluate_split(checkpoint, cfg, evaluator, split, rows, args.steps, args.carry,
                                              args.bands, url=s.dir)
                       for s in cfg.data.sources if args.source in (None, s.name)}
            if args.source is not None:
                result = {"source": args.source, **results[args.source]}
            else:
                loss = mixture_loss({n: r["loss"] for n, r in results.items()},
                                    {s.name: s.weight for s in cfg.data.sources})
                result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "sources": results}
    except (ConfigError, DatasetError, CheckpointError, DataPrepError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, figures in result.get("sources", {"": result}).items():
        print((f"source {name}\n" if name else "") + format_table(figures), file=sys.stderr)
    print(json.dumps({"checkpoint": str(checkpoint.path), "step": checkpoint.step, "split": split, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
