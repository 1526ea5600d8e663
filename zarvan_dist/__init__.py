"""zarvan_dist: models, ops and training components for linear-time language models.

The model API (``ARCHS``, ``ModelConfig``, ``ModelOutput``, ``RecurrentState``, ``build_model``) is
imported on first use, so the parts that need no torch (``zarvan_dist.config``, ``.data`` manifests
and readers, ``.tokenizer``) stay light in the data jobs and their worker processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zarvan_dist.models import ARCHS, ModelConfig, ModelOutput, RecurrentState, build_model

__all__ = ["ARCHS", "ModelConfig", "ModelOutput", "RecurrentState", "build_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        import zarvan_dist.models as models

        return getattr(models, name)
    raise AttributeError(f"module 'zarvan_dist' has no attribute {name!r}")
