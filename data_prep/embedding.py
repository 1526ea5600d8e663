"""Frozen, model-free chunk embeddings for retrieval: hashed unigram and bigram counts.

A chunk of token ids is described by the counts of its tokens and of its adjacent token pairs.
Each such feature is sent by ``hashes`` independent splitmix64 hashes to a coordinate of a
``dim``-dimensional vector with a random sign (a sparse random projection of the count vector,
Achlioptas 2003 / the hashing trick), and the sum is L2-normalised, so the inner product of two
embeddings approximates the cosine similarity of the two chunks' n-gram count vectors. Plain
integer arithmetic on fixed seeds: the same ids give the same float32 vector on every machine
and library version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import DataPrepError
from zarvan_dist.data.hashing import splitmix64_mix, splitmix64_outputs

_BIGRAM_SALT = np.uint64(0xD1B54A32D192ED03)


class HashedNgramEmbedder:
    """``embed(chunks [N, m] int ids) -> [N, dim] float32`` unit vectors (ids < 0 are padding, ignored).

    Args:
        dim: embedding width.
        hashes: coordinates each feature is added to (more: distances preserved more closely).
        seed: selects the hash functions; the same seed gives the same embedder.
        bigram_weight: weight of a pair count relative to a token count.
    """

    def __init__(self, dim: int = 256, hashes: int = 4, seed: int = 0, bigram_weight: float = 1.0) -> None:
        if dim < 1 or hashes < 1:
            raise ValueError(f"dim and hashes must be positive, got dim={dim}, hashes={hashes}")
        self.dim, self.hashes, self.seed, self.bigram_weight = dim, hashes, seed, bigram_weight
        self._salts = splitmix64_outputs(seed, hashes)  # one salt per hash function

    @property
    def spec(self) -> dict[str, Any]:
        """What rebuilds this embedder (``make_embedder(spec)``)."""
        return {"kind": "hashed", "dim": self.dim, "hashes": self.hashes, "seed": self.seed,
                "bigram_weight": self.bigram_weight}

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        if chunks.ndim != 2:
            raise ValueError(f"chunks: expected [N, m] token ids, got shape {chunks.shape}")
        n, m = chunks.shape
        ids = chunks.astype(np.int64)
        valid = ids >= 0
        uni = ids.astype(np.uint64)
        # a pair (a, b) as one 64-bit key, kept apart from the token keys by a salt
        pair = (uni[:, :-1] * np.uint64(0x100000001B3)) ^ uni[:, 1:] ^ _BIGRAM_SALT
        pair_valid = valid[:, :-1] & valid[:, 1:]
        keys = np.concatenate([uni, pair], axis=1)
        weights = np.concatenate([np.ones((n, m)), np.full((n, max(m - 1, 0)), self.bigram_weight)], axis=1)
        weights = weights * np.concatenate([valid, pair_valid], axis=1)
        rows = np.broadcast_to(np.arange(n)[:, None], keys.shape)
        out = np.zeros(n * self.dim, dtype=np.float64)
        for salt in self._salts:
            with np.errstate(over="ignore"):
                h = splitmix64_mix(keys ^ salt)
            column = (h % np.uint64(self.dim)).astype(np.int64)
            sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
            out += np.bincount((rows * self.dim + column).ravel(), (sign * weights).ravel(), minlength=n * self.dim)
        out = out.reshape(n, self.dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class CheckpointEmbedder:
    """``embed(chunks [N, m]) -> [N, E]``: the mean over a chunk's tokens of a trained model's final
    hidden state (the last block's output after the final norm, before the head), L2-normalised.

    Each chunk is read on its own from an empty state, as the start of a document; padding
    (ids < 0) sits after the tokens, so a causal model's hidden states of the tokens ignore it.
    """

    def __init__(self, path: str, device: str = "auto", batch: int = 256, sha256: str | None = None) -> None:
        import torch

        from zarvan_dist.config import ConfigError
        from zarvan_dist.training.checkpoint import CheckpointError, open_checkpoint
        from zarvan_dist.training.engines import resolve_device

        self.torch = torch
        try:
            self.device = resolve_device(device)
        except ConfigError as exc:
            raise DataPrepError(f"--embedder checkpoint:{path}: {exc}") from None
        if sha256 is not None and not Path(path).exists():
            raise DataPrepError(f"the checkpoint the corpus was embedded with, {path}, is gone (a run keeps its "
                                f"newest checkpoint.keep checkpoints): restore it, or embed the corpus again")
        try:
            # a run directory means its latest checkpoint now: the spec names that one checkpoint
            checkpoint = open_checkpoint(path)
            self.model = checkpoint.load_model(self.device).float()
        except (CheckpointError, OSError) as exc:
            raise DataPrepError(f"--embedder checkpoint:{path}: cannot load the model: {exc}") from None
        self.path, self.batch = str(checkpoint.path), batch
        self.dim = self.model.config.d_model
        self.sha256 = weights_sha256(self.model)
        if sha256 is not None and sha256 != self.sha256:
            raise DataPrepError(f"embedder checkpoint {self.path}: its weights (sha256 {self.sha256[:12]}...) are not "
                                f"those the corpus was embedded with (sha256 {sha256[:12]}...)")

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": "checkpoint", "path": self.path, "dim": self.dim, "sha256": self.sha256}

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        torch = self.torch
        chunks = np.asarray(chunks)
        if chunks.ndim != 2:
            raise ValueError(f"chunks: expected [N, m] token ids, got shape {chunks.shape}")
        out = []
        with torch.no_grad():
            for i in range(0, len(chunks), self.batch):
                ids = torch.from_numpy(chunks[i:i + self.batch].astype(np.int64)).to(self.device)
                valid = (ids >= 0).to(torch.float32)
                x, *_ = self.model.run_blocks(ids.clamp(min=0), None, None)
                h = self.model.norm(x).float() * valid[..., None]
                mean = h.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
                out.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


def weights_sha256(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes and bytes, in name order)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_embedder(spec: str | dict[str, Any], dim: int = 256, device: str = "auto"):
    """An embedder from the job option (``hashed`` or ``checkpoint:PATH``, hashed of width ``dim``) or
    from the ``spec`` dict an embeddings manifest recorded."""
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "hashed":
            return HashedNgramEmbedder(spec["dim"], spec["hashes"], spec["seed"], spec["bigram_weight"])
        if kind == "checkpoint":
            return CheckpointEmbedder(spec["path"], device, sha256=spec.get("sha256"))
        raise DataPrepError(f"unknown embedder kind {kind!r} (expected hashed or checkpoint)")
    if spec == "hashed":
        return HashedNgramEmbedder(dim)
    if spec.startswith("checkpoint:") and len(spec) > len("checkpoint:"):
        return CheckpointEmbedder(spec[len("checkpoint:"):], device)
    raise DataPrepError(f"--embedder: expected hashed or checkpoint:PATH, got {spec!r}")
