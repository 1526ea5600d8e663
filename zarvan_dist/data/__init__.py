"""Token-shard datasets: the manifest, the shard layout, a reader that maps windows to shards, and the
neighbour sidecar (retrieved text per window chunk) with its reader."""

from zarvan_dist.data.lanes import LaneLayout
from zarvan_dist.data.manifest import (
    SPLITS,
    Manifest,
    ShardEntry,
    SplitEntry,
    Splits,
    TokenizerEntry,
    dtype_for_vocab,
)
from zarvan_dist.data.neighbours import NeighbourManifest, NeighbourReader
from zarvan_dist.data.reader import WindowReader
from zarvan_dist.data.shards import DatasetError

__all__ = [
    "SPLITS",
    "DatasetError",
    "LaneLayout",
    "Manifest",
    "NeighbourManifest",
    "NeighbourReader",
    "ShardEntry",
    "SplitEntry",
    "Splits",
    "TokenizerEntry",
    "WindowReader",
    "dtype_for_vocab",
]
