"""Evaluate a checkpoint: ``python -m pretrain.eval --checkpoint PATH [--split val | --text FILE ...]``.

**A split** (default ``val``): its windows are dealt to ``--rows`` lanes (as in training) and read in
order from each lane's start; a retrieval model reads the neighbours the run read (``data.neighbours``)
or those ``--neighbours`` names.

**Raw text** (``--text FILE_OR_URL ...``, fsspec URLs, globs or directories as ``data_prep`` reads them):
each file is one document (a JSON-lines file: one per line), encoded with the run's tokenizer (or
``--tokenizer``), led by BOS and cut into windows of the run's ``seq_len`` (or ``--seq-len``);
``--rows`` documents are read side by side, each from its own start.

The recurrent state is carried from window to window (``--no-carry``: reset before every window).

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
import json
import math
import sys
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from data_prep import DataPrepError
from data_prep.corpus import CorpusConfig, read_corpus
from pretrain.train import Trainer, reset_rows
from zarvan_dist.config import ConfigError, apply_overrides, load_yaml
from zarvan_dist.data import SPLITS, DatasetError, LaneLayout
from zarvan_dist.data.loader import LaneLoader
from zarvan_dist.data.manifest import dataset_root
from zarvan_dist.models import RecurrentState
from zarvan_dist.ops.segments import last_reset_index, segment_positions
from zarvan_dist.tokenizer import TokenizerError, encode_documents, load_tokenizer
from zarvan_dist.training.checkpoint import CheckpointError, resolve_checkpoint
from zarvan_dist.training.config import RunConfig

DEFAULT_BAND_EDGES = [128 * 4 ** k for k in range(8)]
"""Band edges in tokens: 128, 512, 2k, ... 2M; the last band, [2M, ...), is open."""
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


def target_positions(inputs: torch.Tensor, bos_id: int, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position in its document of each target of a window (see the module docstring), -1 where unknown.

    Args:
        inputs: [B, T] int64, the window's input tokens.
        bos_id: the id that starts a document.
        start: [B] int64, the document position of the first input token, -1 where unknown.

    Returns:
        positions [B, T] int64 of the targets, and the ``start`` of the next window [B].
    """
    bos = inputs == bos_id
    positions, following = segment_positions(start.clamp(min=0), bos, inputs.shape[1])
    known = (start >= 0)[:, None] | (last_reset_index(bos) >= 0)
    return torch.where(known, positions + 1, -1), torch.where(known[:, -1], following, -1)


class LossBands:
    """Next-token loss summed per band of target position, and apart for unknown positions.

    Band i holds positions [edges[i], edges[i + 1]), the last band [edges[-1], ...). Sums stay on the
    device, in float64, until ``summary``.
    """

    def __init__(self, edges: list[int], device: torch.device) -> None:
        self.starts = [0, *edges]
        self.bounds = torch.tensor(edges, dtype=torch.long, device=device)
        self.sums = torch.zeros(len(self.starts) + 1, dtype=torch.float64, device=device)  # last: unknown
        self.counts = torch.zeros(len(self.starts) + 1, dtype=torch.long, device=device)

    def add(self, losses: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """losses [B, T] float, positions [B, T] int64 (-1: unknown), mask [B, T] bool (False: not a target)."""
        slot = torch.bucketize(positions, self.bounds, right=True)
        slot = torch.where(positions >= 0, slot, len(self.starts)).flatten()
        losses = losses.flatten().double()
        if mask is not None:
            keep = mask.flatten()
            slot, losses = slot[keep], losses[keep]
        self.sums.index_add_(0, slot, losses)
        self.counts.index_add_(0, slot, torch.ones_like(slot))

    def summary(self) -> dict:
        """loss, perplexity and tokens of every target; bands up to the last one holding a target;
        unknown_position."""
        sums, counts = self.sums.tolist(), self.counts.tolist()
        known = [i for i, n in enumerate(counts[:-1]) if n]
        bands = [{"from": self.starts[i], "to": self.starts[i + 1] if i + 1 < len(self.starts) else None,
                  **_mean(sums[i], counts[i])} for i in range(known[-1] + 1 if known else 0)]
        overall = _mean(sum(sums), sum(counts))
        return {"loss": overall["loss"], "perplexity": overall["perplexity"], "tokens": overall["tokens"],
                "bands": bands, "unknown_position": _mean(sums[-1], counts[-1])}


def _mean(total: float, count: int) -> dict:
    loss = total / count if count else None
    return {"tokens": count, "loss": loss, "perplexity": None if loss is None else math.exp(min(loss, 50.0))}


@torch.no_grad()
def accumulate_losses(trainer: Trainer, windows: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                torch.Tensor | None]],
                      carry: bool, bands: LossBands) -> int:
    """Run the model over ``windows`` and add each target's loss to ``bands``; returns the windows' count.

    Each item is (tokens [B, S + 1] int64, reset [B] bool: a row's stream restarts here, mask [B, S]
    bool of the targets to count or None for all, neighbours [B, n, K, L] int64 or None). Rows carry
    their state and document position to their next window; with ``carry`` False the state is reset
    before every window (the position is still counted on).
    """
    was_training = trainer.engine.training
    trainer.engine.train(False)
    device, bos_id = trainer.device, trainer.manifest.bos_id
    state, start, count = None, None, 0
    for tokens, reset, mask, neighbours in windows:
        tokens = tokens.to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        fresh = trainer.model.init_state(inputs.shape[0], device)
        state = reset_rows(state, reset, fresh) if carry and state is not None else fresh
        reset = reset.to(device)
        extra = () if neighbours is None else (neighbours.to(device),)
        with trainer.autocast():
            out = trainer.engine.forward(inputs, state, inputs == bos_id, *extra)
        state = RecurrentState({k: v.contiguous() for k, v in out.state.items()})
        losses = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        if start is None:
            start = torch.full_like(reset, -1, dtype=torch.long)
        start = torch.where(reset, -1, start)
        positions, start = target_positions(inputs, bos_id, start)
        bands.add(losses.view_as(targets), positions, None if mask is None else mask.to(device))
        count += inputs.shape[0] if mask is None else int(mask.any(1).sum())
    trainer.engine.train(was_training)
    return count


def evaluate_split(trainer: Trainer, split: str, rows: int, steps: int, carry: bool, edges: list[int]) -> dict:
    """``steps`` windows (0: all) of each of ``rows`` lanes of ``split``, from the lanes' start."""
    layout = LaneLayout(trainer.manifest.split(split).windows, rows)
    steps = min(steps or layout.lane_len, layout.lane_len)
    loader = iter(LaneLoader(trainer.cfg.data.dir, split, layout, neighbours=trainer.cfg.data.neighbours))
    bands = LossBands(edges, trainer.device)
    try:
        batches = ((b.tokens, b.reset, None, b.neighbours) for b in islice(loader, steps))
        accumulate_losses(trainer, batches, carry, bands)
    finally:
        loader.close()
    result = bands.summary()
    return {"loss": result["loss"], "perplexity": result["perplexity"], "tokens": result["tokens"],
            "windows": steps * layout.rows, "carry": carry, "bands": result["bands"],
            "unknown_position": result["unknown_position"]}


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


def text_windows(documents: list[np.ndarray], rows: int, seq_len: int,
                 pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]]:
    """Windows of BOS-led documents read side by side, in ``accumulate_losses``'s form.

    Row r reads a document's windows in order (window k: tokens [k*S, (k+1)*S], S = ``seq_len``), then
    takes the next document not yet read (reset). A document's last window and rows with nothing left
    are padded with ``pad_id``, masked out; padding only follows a row's real tokens, which a causal
    model reads unchanged.
    """
    pending = iter(documents)
    current: list[np.ndarray | None] = [None] * rows
    offset = [0] * rows
    while True:
        tokens = np.full((rows, seq_len + 1), pad_id, dtype=np.int64)
        mask = np.zeros((rows, seq_len), dtype=bool)
        reset = np.zeros(rows, dtype=bool)
        for r in range(rows):
            if current[r] is None or offset[r] >= len(current[r]) - 1:
                current[r], offset[r], reset[r] = next(pending, None), 0, True
            if current[r] is not None:
                piece = current[r][offset[r]:offset[r] + seq_len + 1]
                tokens[r, :len(piece)] = piece
                mask[r, :len(piece) - 1] = True
                offset[r] += seq_len
        if not mask.any():
            return
        yield torch.from_numpy(tokens), torch.from_numpy(reset), torch.from_numpy(mask), None


def evaluate_text(trainer: Trainer, inputs: list[str], tokenizer: str | None, rows: int, seq_len: int | None,
                  carry: bool, edges: list[int]) -> dict:
    """The documents of ``inputs`` (see ``read_text_documents``) encoded with ``tokenizer`` (None: the run's)."""
    texts = read_text_documents(inputs)
    manifest = trainer.manifest
    url = tokenizer or f"{dataset_root(trainer.cfg.data.dir)}/{manifest.tokenizer.path}"
    try:
        loaded = load_tokenizer(url)
        sp, data = loaded.processor, loaded.data
    except TokenizerError as exc:
        if tokenizer:
            raise
        raise DataPrepError(f"{exc}; name the run's tokenizer with --tokenizer") from None
    vocab = trainer.model_cfg.vocab_size
    if sp.get_piece_size() > vocab or sp.bos_id() != manifest.bos_id:
        raise DataPrepError(f"tokenizer {url}: {sp.get_piece_size()} pieces, BOS {sp.bos_id()}; the model "
                            f"reads a vocabulary of {vocab} with BOS {manifest.bos_id}: not the run's tokenizer")
    manifest.check_tokenizer(url, data, trainer.cfg.data.dir)
    tokens, lengths = encode_documents(sp, texts, "int64")
    documents = np.split(tokens, np.cumsum(lengths)[:-1])
    seq_len = seq_len or trainer.seq_len
    bands = LossBands(edges, trainer.device)
    windows = accumulate_losses(trainer, text_windows(documents, min(rows, len(documents)), seq_len,
                                                      manifest.pad_id), carry, bands)
    result = bands.summary()
    return {"loss": result["loss"], "perplexity": result["perplexity"], "tokens": result["tokens"],
            "windows": windows, "carry": carry, "bands": result["bands"], "text": inputs,
            "documents": len(documents), "seq_len": seq_len}


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
    parser.add_argument("--data-dir", default=None, metavar="URL", help="dataset to read (default: the run's data.dir)")
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
    split = None if args.text is not None else args.split or "val"
    try:
        path = resolve_checkpoint(args.checkpoint)
        overrides = ["engine=single", f"train.device={args.device}"] + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
        if args.neighbours is not None or args.text is not None:  # raw text has no neighbours
            overrides.append(f"data.neighbours={'null' if args.neighbours in (None, 'none') else args.neighbours}")
        cfg = RunConfig.from_dict(apply_overrides(load_yaml(path / "config.yaml"), overrides))
        trainer = Trainer(cfg)
        trainer.load_weights(path)
        rows = args.rows or cfg.eval.rows
        if split is None:
            result = evaluate_text(trainer, args.text, args.tokenizer, rows, args.seq_len, args.carry, args.bands)
        else:
            result = evaluate_split(trainer, split, rows, args.steps, args.carry, args.bands)
    except (ConfigError, DatasetError, CheckpointError, DataPrepError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    step = json.loads((path / "trainer.json").read_text())["step"]
    print(format_table(result), file=sys.stderr)
    print(json.dumps({"checkpoint": str(path), "step": step, "split": split, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
