"""Sequence-mixing ops with shape docstrings: the fast forms the models call (``naive`` holds the
pure-PyTorch references they are tested against).

Ops know nothing of layers; every op takes an initial state and returns its final state.
"""

from zarvan_dist.ops.attention import document_ids, empty_kv_cache, prefix_attention, windowed_attention
from zarvan_dist.ops.causal_conv import causal_conv1d
from zarvan_dist.ops.prefix_softmax import EMPTY_MAX, empty_softmax_state, prefix_softmax_pool
from zarvan_dist.ops.scan import linear_scan, running_max
from zarvan_dist.ops.segments import last_reset_index, prefix_sum, segment_positions

__all__ = [
    "EMPTY_MAX", "causal_conv1d", "document_ids", "empty_kv_cache", "empty_softmax_state", "last_reset_index",
    "linear_scan", "prefix_attention", "prefix_softmax_pool", "prefix_sum", "running_max", "segment_positions",
    "windowed_attention",
]
