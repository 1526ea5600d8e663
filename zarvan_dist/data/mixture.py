"""Mixtures: the G global rows dealt to several datasets, each row a lane of one source.

Rows are dealt in proportion to the weights by the largest-remainder rule: source i first gets
``floor(G * w_i / sum(w))`` rows; the rows left over go one each to the sources with the largest
fractional parts ``G * w_i / sum(w) - floor(...)``, ties to the earlier source. A source must end
with at least one row (else ``data.rows`` is too small for the weights). The global rows are laid
out source after source — source 0 holds rows ``[0, G_0)``, source 1 ``[G_0, G_0 + G_1)``, ... —
and within a source its rows are the lanes of its train split exactly as with one dataset
(``LaneLayout``): a row only ever reads its own source's windows in lane order, so its recurrent
state stays inside that source's documents, and each source wraps into its next epoch on its own.
The micro-step (counted from where the layout began) is still the whole cursor.

Ranks take contiguous blocks of G / R global rows (``rank_rows``), as with one dataset, so a rank
may hold rows of several sources and every rank holds the same number of rows; a resume on another
world size that divides G keeps every lane and state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zarvan_dist.data.lanes import LaneLayout, rank_rows


def deal_rows(weights: Sequence[float], rows: int, names: Sequence[str]) -> list[int]:
    """Rows of each source: largest remainder of ``rows * w / sum(w)``, each source at least one.

    Raises ValueError naming the source that would get no row.
    """
    if rows < len(weights):
        raise ValueError(f"data.rows is {rows}, fewer than the {len(weights)} sources: every source needs a row")
    total = math.fsum(weights)
    quotas = [rows * w / total for w in weights]
    dealt = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - dealt[i]), i))
    for i in order[:rows - sum(dealt)]:
        dealt[i] += 1
    for name, weight, n in zip(names, weights, dealt):
        if n == 0:
            raise ValueError(f"data.rows {rows} is too small for the weights given: source {name} (weight {weight:g} "
                             f"of {total:g}) gets no row; raise data.rows or that source's weight")
    return dealt


@dataclass(frozen=True)
class MixtureLayout:
    """The global rows of several sources' lanes (one source: exactly its ``LaneLayout``)."""

    layouts: tuple[LaneLayout, ...]
    """Each source's lanes over its train split, in row order; ``layouts[i].rows`` is its share of the rows."""

    @property
    def rows(self) -> int:
        """G, rows of the global batch."""
        return sum(layout.rows for layout in self.layouts)

    @property
    def starts(self) -> list[int]:
        """First global row of each source."""
        return [int(x) for x in np.cumsum([0] + [layout.rows for layout in self.layouts])[:-1]]

    def rank_rows(self, rank: int, world: int) -> range:
        """The global rows rank ``rank`` of ``world`` reads (G / world contiguous rows)."""
        return rank_rows(self.rows, rank, world)

    def parts(self, rows: range) -> list[tuple[int, range]]:
        """(source, its local rows) of each source that ``rows`` (contiguous global rows) reach, in row order."""
        out = []
        for i, (start, layout) in enumerate(zip(self.starts, self.layouts)):
            lo, hi = max(rows.start, start), min(rows.stop, start + layout.rows)
            if lo < hi:
                out.append((i, range(lo - start, hi - start)))
        return out

    def source_of(self, rows: range) -> np.ndarray:
        """[len(rows)] int64: the source of each global row."""
        return np.searchsorted(np.asarray(self.starts), np.arange(rows.start, rows.stop), side="right") - 1

    def epochs(self, step: int) -> list[int]:
        """Each source's epoch at micro-step ``step`` (windows read by a lane // lane length)."""
        return [step // layout.lane_len for layout in self.layouts]
