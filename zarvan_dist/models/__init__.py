"""The model library: one config, one factory, every arch behind the same causal interface."""

from __future__ import annotations

import importlib

from torch import nn

from zarvan_dist.models.common import CausalLM, ModelOutput
from zarvan_dist.models.config import ARCHS, ModelConfig
from zarvan_dist.models.state import RecurrentState

# arch -> "module:Class" of the causal LM; modules are imported on first use
CAUSAL_MODELS = {
    "zarvan": "zarvan_dist.models.zarvan:ZarvanLM",
    "zarvan_v1": "zarvan_dist.models.zarvan_v1:ZarvanV1LM",
    "nonattn": "zarvan_dist.models.nonattn:NonAttnLM",
    "transformer": "zarvan_dist.models.transformer:TransformerLM",
    "slam": "zarvan_dist.models.slam:SlamLM",
    "zephyra": "zarvan_dist.models.transformer:TransformerLM",
}
# arch -> the published bidirectional classifier (``causal: false``)
CLASSIFIERS = {
    "zarvan": "zarvan_dist.models.zarvan:ZarvanForSequenceClassification",
    "zarvan_v1": "zarvan_dist.models.zarvan_v1:ZarvanV1ForSequenceClassification",
}


def _load(path: str) -> type[nn.Module]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The module for ``cfg``: a causal LM, or the bidirectional classifier when ``causal`` is false."""
    table = CAUSAL_MODELS if cfg.causal else CLASSIFIERS
    return _load(table[cfg.arch])(cfg)


__all__ = ["ARCHS", "CausalLM", "ModelConfig", "ModelOutput", "RecurrentState", "build_model"]
