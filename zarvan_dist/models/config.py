"""The model configuration: one dataclass for every arch, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from zarvan_dist.config import ConfigError, from_dict, load_yaml, to_dict

Arch = Literal["zarvan", "zarvan_v1", "nonattn", "transformer", "slam", "zephyra"]
ARCHS: tuple[str, ...] = get_args(Arch)


@dataclass
class ModelConfig:
    """Architecture and size of a model. Fields an arch does not use are ignored by it."""

    arch: Arch
    """Which model: zarvan, zarvan_v1, nonattn, transformer, slam or zephyra."""
    vocab_size: int
    """Number of token ids (the tokenizer's vocabulary size)."""
    d_model: int = 256
    """Model width E."""
    n_layers: int = 4
    """Number of blocks (slam: unused; its depth is 2 + 2 * ef_cycles)."""
    n_heads: int = 4
    """Heads h (attention heads; holistic / query-extractor heads for the Zarvan blocks)."""
    d_ff: int = 0
    """Hidden width of the feed-forward layers; 0 means 4 * d_model."""
    dropout: float = 0.0
    """Dropout probability (residual branches and embeddings)."""
    causal: bool = True
    """Causal language model (true) or the published bidirectional form (zarvan, zarvan_v1)."""
    chunk_size: int = 8
    """Block length (>= 2) of the linear scans of the Zarvan pools, the form compiled models and
    short windows use (a speed knob; results do not depend on it; 8 is the fastest on CPU)."""
    seq_norm: float = 1024.0
    """Constant normaliser N of the running sums (zarvan sequential extractor, zarvan_v1 query)."""
    embedding: Literal["standard", "adaptive"] = "standard"
    """Token embedding: one table, or adaptive input bands split at `cutoffs`."""
    cutoffs: list[int] = field(default_factory=list)
    """Adaptive input band edges, increasing and below vocab_size (ids sorted by frequency)."""
    adaptive_factor: float = 4.0
    """Band i of the adaptive input embeds to d_model / adaptive_factor**i dimensions."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head (standard embedding only)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    conv_kernel: int = 16
    """nonattn: kernel length of the depthwise causal convolution ("S4" block)."""
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4])
    """nonattn: dilations of the multi-resolution block's k=3 causal convolutions."""
    supervisor_chunk: int = 64
    """nonattn: tokens per chunk of the recurrent supervisor (and of retrieval)."""
    retrieval: bool = False
    """nonattn: build the retrieval-fusion input (neighbour token ids per chunk)."""
    retrieval_len: int = 64
    """nonattn: tokens per retrieved neighbour (m)."""
    attn_window: int = 1024
    """Attention baselines (transformer, zephyra): keys visible to a query (itself included); the KV
    cache keeps the attn_window - 1 tokens before a chunk. slam attends over its whole window."""
    ef_cycles: int = 2
    """slam: number of encoder-fusion cycles (blocks A and B each)."""
    num_classes: int = 0
    """Bidirectional classifiers (causal: false): number of classes."""
    pooled: bool = True
    """Bidirectional classifiers: one label per sequence (mean pool) or one per token."""

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}: {getattr(self, key)!r} {why}")

        if self.arch not in ARCHS:
            raise bad("arch", f"is not one of {list(ARCHS)}")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size", "conv_kernel",
                    "supervisor_chunk", "retrieval_len", "attn_window"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be positive")
        for key in ("d_ff", "ef_cycles", "num_classes"):
            if getattr(self, key) < 0:
                raise bad(key, "must not be negative")
        if self.chunk_size < 2:
            raise bad("chunk_size", "must be at least 2")
        if self.d_model % self.n_heads:
            raise bad("d_model", f"must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.seq_norm <= 0:
            raise bad("seq_norm", "must be positive")
        if self.init_std <= 0:
            raise bad("init_std", "must be positive")
        if any(d <= 0 for d in self.dilations) or not self.dilations:
            raise bad("dilations", "must be a non-empty list of positive integers")
        if self.cutoffs:
            edges = [0, *self.cutoffs, self.vocab_size]
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise bad("cutoffs", f"must increase strictly between 0 and vocab_size={self.vocab_size}")
        if self.arch == "zephyra" and self.embedding != "adaptive":
            raise bad("embedding", "must be 'adaptive' for arch zephyra (its defining feature)")
        if self.embedding == "adaptive":
            if not self.cutoffs:
                raise bad("cutoffs", "must be set when embedding is 'adaptive'")
            if self.adaptive_factor < 1:
                raise bad("adaptive_factor", "must be at least 1")
            if self.d_model // int(self.adaptive_factor ** len(self.cutoffs)) < 1:
                raise bad("cutoffs", "give a band narrower than one dimension")
            if self.tie_embeddings:
                raise bad("tie_embeddings", "is only supported with the standard embedding")
        if not self.causal:
            if self.arch not in ("zarvan", "zarvan_v1"):
                raise bad("causal", f"false exists only for zarvan and zarvan_v1, not {self.arch}")
            if self.num_classes < 1:
                raise bad("num_classes", "must be set for a bidirectional (causal: false) classifier")

    @property
    def ffn_dim(self) -> int:
        """Feed-forward hidden width."""
        return self.d_ff or 4 * self.d_model

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from plain data; unknown keys and bad values name the key."""
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        """Load a model YAML (the fields above at top level, or under a `model:` section)."""
        data = load_yaml(path)
        if "model" in data and isinstance(data["model"], dict) and "arch" not in data:
            data = data["model"]
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        """Plain-data form (the inverse of from_dict)."""
        return to_dict(self)
