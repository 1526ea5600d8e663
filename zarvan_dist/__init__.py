"""zarvan_dist: models, ops and training components for linear-time language models."""

from zarvan_dist.models import ARCHS, ModelConfig, ModelOutput, RecurrentState, build_model

__all__ = ["ARCHS", "ModelConfig", "ModelOutput", "RecurrentState", "build_model"]
__version__ = "0.1.0"
