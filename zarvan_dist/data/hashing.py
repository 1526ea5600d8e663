"""splitmix64: the integer hash behind every seeded choice in the data (document shuffle, lane offsets,
hashed embeddings).

Contract: plain uint64 arithmetic (wrapping modulo 2**64), so a value depends only on its inputs, never
on a platform or a library's random-number streams. Datasets on disk and resumed runs rely on these
values; changing them moves shuffles, lanes and embeddings of data already written.
"""

from __future__ import annotations

import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
"""The splitmix64 increment: the generator's state advances by it at each output."""


def splitmix64_mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 output function on uint64 states ``z`` (any shape): well-mixed 64-bit ints, same shape."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def splitmix64_outputs(seed: int, n: int, start: int = 0) -> np.ndarray:
    """Outputs start + 1 .. start + n of the splitmix64 generator seeded with ``seed`` (taken modulo 2**64):
    [n] uint64 (a long stream is taken block by block with ``start``).

    Output i is ``splitmix64_mix(seed + i * GOLDEN_GAMMA)``.
    """
    with np.errstate(over="ignore"):
        states = np.uint64(int(seed) % (1 << 64)) + np.arange(start + 1, start + n + 1, dtype=np.uint64) * GOLDEN_GAMMA
    return splitmix64_mix(states)
