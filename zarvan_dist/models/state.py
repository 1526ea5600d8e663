"""RecurrentState: the named tensors a causal model carries from one window to the next."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import Tensor

Rows = slice | Tensor | list[int]


class RecurrentState:
    """Named tensors whose first dimension is the batch row.

    Names are dotted paths (``layers.0.holistic.m``) so the state flattens to a dict of
    tensors for checkpoints. A state with no tensors is valid (a model that carries nothing)
    and has ``batch_size`` None.
    """

    def __init__(self, tensors: Mapping[str, Tensor] | None = None) -> None:
        self._tensors: dict[str, Tensor] = dict(tensors or {})
        sizes = {name: t.shape[0] if t.dim() else None for name, t in self._tensors.items()}
        if None in sizes.values():
            raise ValueError(f"state tensor '{next(k for k, v in sizes.items() if v is None)}' has no batch dimension")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"state tensors disagree on the batch size: {sizes}")

    # mapping-like access
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self):
        return self._tensors.keys()

    def items(self):
        return self._tensors.items()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._tensors.items())
        return f"RecurrentState({shapes})"

    @property
    def batch_size(self) -> int | None:
        """Number of rows, or None for an empty state."""
        for t in self._tensors.values():
            return t.shape[0]
        return None

    def sub(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under ``prefix.`` with the prefix stripped (a layer's own part)."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self._tensors.items() if k.startswith(p)}

    @classmethod
    def join(cls, parts: Mapping[str, Mapping[str, Tensor]]) -> "RecurrentState":
        """Inverse of ``sub``: ``{prefix: {name: tensor}}`` -> one state with dotted names."""
        return cls({f"{p}.{k}": v for p, d in parts.items() for k, v in d.items()})

    # row operations
    def detach(self) -> "RecurrentState":
        """The same values cut from the autograd graph (truncated backprop through time)."""
        return RecurrentState({k: v.detach() for k, v in self._tensors.items()})

    def select(self, rows: Rows) -> "RecurrentState":
        """The rows ``rows`` (a slice, index list/tensor or boolean mask) as a new state."""
        return RecurrentState({k: v[rows] for k, v in self._tensors.items()})

    def write_(self, rows: Rows, other: "RecurrentState") -> "RecurrentState":
        """Write ``other``'s rows into ``rows`` of this state, in place; returns self."""
        if set(other.keys()) != set(self.keys()):
            raise KeyError(f"state names differ: {sorted(set(other.keys()) ^ set(self.keys()))}")
        with torch.no_grad():
            for k, v in self._tensors.items():
                v[rows] = other[k].to(dtype=v.dtype, device=v.device)
        return self

    def to(self, *args, **kwargs) -> "RecurrentState":
        """Move every tensor (``Tensor.to`` arguments); integer tensors keep their dtype."""
        out = {}
        for k, v in self._tensors.items():
            if not v.is_floating_point():
                kwargs_i = {kk: vv for kk, vv in kwargs.items() if kk != "dtype"}
                args_i = tuple(a for a in args if not isinstance(a, torch.dtype))
                out[k] = v.to(*args_i, **kwargs_i)
            else:
                out[k] = v.to(*args, **kwargs)
        return RecurrentState(out)

    @staticmethod
    def cat(states: list["RecurrentState"]) -> "RecurrentState":
        """Stack the rows of several states with the same names."""
        if not states:
            return RecurrentState()
        return RecurrentState({k: torch.cat([s[k] for s in states]) for k in states[0].keys()})

    # checkpoint form
    def to_dict(self) -> dict[str, Tensor]:
        """A flat ``{name: tensor}`` dict (the tensors themselves, not copies)."""
        return dict(self._tensors)

    @classmethod
    def from_dict(cls, tensors: Mapping[str, Tensor]) -> "RecurrentState":
        """Inverse of ``to_dict``."""
        return cls(tensors)
