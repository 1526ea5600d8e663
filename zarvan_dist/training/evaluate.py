"""Evaluation: next-token loss over windows read with the recurrent state carried, overall and per band
of target position. The trainer's periodic validation and ``pretrain.eval`` both use ``Evaluator``.

**Windows.** Rows read windows side by side; each row carries its state to its next window and
resets it where its stream restarts (a lane's start, a new document of raw text). ``forward_window``
is the one forward of a window, for training and evaluation alike.

**Bands.** A target's position is its index in its document (BOS at 0), i.e. the number of the
document's tokens read when it is predicted; a BOS target, which ends the document before it, counts
as the position after that document's last token. A lane mostly starts inside a document whose start
it never read: the targets before the lane's first BOS have no known position and are counted apart
(``unknown_position``), not in any band; the overall loss counts every target.
"""

from __future__ import annotations

import contextlib
import math
from itertools import islice
from typing import Any, Callable, ContextManager, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from zarvan_dist.data.lanes import LaneLayout
from zarvan_dist.data.loader import LaneLoader
from zarvan_dist.models import CausalLM, RecurrentState
from zarvan_dist.ops.segments import last_reset_index, segment_positions

DEFAULT_BAND_EDGES = [128 * 4 ** k for k in range(8)]
"""Band edges in tokens: 128, 512, 2k, ... 2M; the last band, [2M, ...), is open."""

Window = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]
"""(tokens [B, S + 1] int64, reset [B] bool: the row's stream restarts here, mask [B, S] bool of the
targets to count or None for all, neighbours [B, n, K, L] int64 or None)."""


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float32: logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def mixture_loss(losses: dict[str, float], weights: dict[str, float]) -> float:
    """The mean of a mixture's per-source losses (name -> loss) weighted by the sources' weights."""
    return sum(weights[name] * loss for name, loss in losses.items()) / sum(weights[name] for name in losses)


def row_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] mean cross-entropy of each row in float32: logits [B, T, V], targets [B, T]."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape).mean(1)


def reset_rows(state: RecurrentState, rows: torch.Tensor, fresh: RecurrentState) -> RecurrentState:
    """``state`` with the rows where ``rows`` [B] is True replaced by ``fresh``'s (in place)."""
    if not bool(rows.any()):
        return state
    rows = rows.to(state["pos"].device)  # every causal model carries its position counter
    return state.write_(rows, fresh.select(rows))


def forward_window(forward: Callable[..., Any], model: CausalLM, inputs: torch.Tensor, state: RecurrentState | None,
                   reset: torch.Tensor, bos_id: int, neighbours: torch.Tensor | None = None, carry: bool = True,
                   autocast: Callable[[], ContextManager] = contextlib.nullcontext
                   ) -> tuple[torch.Tensor, RecurrentState]:
    """The logits [B, T, V] of one window of ``inputs`` [B, T] and the rows' state after it (detached).

    ``forward`` is the model or the engine wrapping it. The state going in is ``state`` with the rows
    where ``reset`` [B] is set started afresh; a fresh state for every row where ``carry`` is False or
    there is no ``state`` yet. A BOS inside the window resets a row's state there.
    """
    fresh = model.init_state(inputs.shape[0], inputs.device)
    state = reset_rows(state, reset, fresh) if carry and state is not None else fresh
    extra = () if neighbours is None else (neighbours,)  # the forward of a model without retrieval takes three
    with autocast():
        out = forward(inputs, state, inputs == bos_id, *extra)
    # contiguous: the same strides as init_state's, so a compiled block is not compiled twice
    return out.logits, RecurrentState({k: v.detach().contiguous() for k, v in out.state.items()})


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

    def summary(self, reduce: Callable[[list[float]], list[float]] = list) -> dict:
        """loss, perplexity and tokens of every target; bands up to the last one holding a target;
        unknown_position. ``reduce`` sums the figures over the ranks of a job."""
        n = len(self.starts) + 1
        figures = reduce(self.sums.tolist() + self.counts.tolist())
        sums, counts = figures[:n], [int(c) for c in figures[n:]]
        known = [i for i, c in enumerate(counts[:-1]) if c]
        bands = [{"from": self.starts[i], "to": self.starts[i + 1] if i + 1 < len(self.starts) else None,
                  **_mean(sums[i], counts[i])} for i in range(known[-1] + 1 if known else 0)]
        overall = _mean(sum(sums), sum(counts))
        return {"loss": overall["loss"], "perplexity": overall["perplexity"], "tokens": overall["tokens"],
                "bands": bands, "unknown_position": _mean(sums[-1], counts[-1])}


def _mean(total: float, count: int) -> dict:
    loss = total / count if count else None
    return {"tokens": count, "loss": loss, "perplexity": None if loss is None else math.exp(min(loss, 50.0))}


class Evaluator:
    """Next-token loss of a model over windows, state carried, per band of target position.

    ``forward`` is what runs a window (the model, or the engine wrapping it in a job); ``reduce`` sums
    figures over the ranks (``Collective.sum``; the identity in one process). The caller puts the
    model in eval mode.
    """

    def __init__(self, model: CausalLM, device: torch.device, bos_id: int, forward: Callable[..., Any] | None = None,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 reduce: Callable[[list[float]], list[float]] = list) -> None:
        self.model, self.device, self.bos_id = model, device, bos_id
        self.forward = forward or model
        self.autocast, self.reduce = autocast, reduce

    @torch.no_grad()
    def accumulate(self, windows: Iterable[Window], bands: LossBands, carry: bool = True) -> int:
        """Run the model over ``windows`` and add each target's loss to ``bands``; returns the windows read.

        Rows carry their state and document position to their next window; with ``carry`` False the
        state is reset before every window (the position is still counted on).
        """
        state, start, count = None, None, 0
        for tokens, reset, mask, neighbours in windows:
            tokens = tokens.to(self.device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            logits, state = forward_window(self.forward, self.model, inputs, state, reset, self.bos_id,
                                           None if neighbours is None else neighbours.to(self.device), carry,
                                           self.autocast)
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            reset = reset.to(self.device)
            start = torch.where(reset, -1, torch.full_like(reset, -1, dtype=torch.long) if start is None else start)
            positions, start = target_positions(inputs, self.bos_id, start)
            bands.add(losses.view_as(targets), positions, None if mask is None else mask.to(self.device))
            count += inputs.shape[0] if mask is None else int(mask.any(1).sum())
        return count

    def lanes(self, data_dir: str, split: str, layout: LaneLayout, rows: range | None = None, steps: int = 0,
              carry: bool = True, edges: list[int] = DEFAULT_BAND_EDGES, neighbours: str | None = None) -> dict:
        """``steps`` windows (0, and at most: every window) of each of this rank's ``rows`` (default: all) of
        ``layout``'s lanes over ``split`` of the dataset ``data_dir``, from the lanes' start.

        Returns loss (mean next-token cross-entropy over the job's targets, nats), perplexity, tokens,
        windows (the job's), carry, bands and unknown_position.
        """
        steps = min(steps or layout.lane_len, layout.lane_len)
        loader = iter(LaneLoader(data_dir, split, layout, rows=rows, neighbours=neighbours))
        bands = LossBands(edges, self.device)
        try:
            self.accumulate(((b.tokens, b.reset, None, b.neighbours) for b in islice(loader, steps)), bands, carry)
        finally:
            loader.close()
        return {**self._result(bands), "windows": steps * layout.rows, "carry": carry}

    def documents(self, documents: list[np.ndarray], rows: int, seq_len: int, pad_id: int, carry: bool = True,
                  edges: list[int] = DEFAULT_BAND_EDGES) -> dict:
        """Token documents (each led by BOS) read ``rows`` side by side (``document_windows``)."""
        bands = LossBands(edges, self.device)
        windows = self.accumulate(document_windows(documents, min(rows, len(documents)), seq_len, pad_id), bands, carry)
        return {**self._result(bands), "windows": windows, "carry": carry}

    def _result(self, bands: LossBands) -> dict:
        summary = bands.summary(self.reduce)
        return {key: summary[key] for key in ("loss", "perplexity", "tokens", "bands", "unknown_position")}


def document_windows(documents: list[np.ndarray], rows: int, seq_len: int, pad_id: int) -> Iterator[Window]:
    """Windows of BOS-led documents read side by side, in ``Evaluator.accumulate``'s form.

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
