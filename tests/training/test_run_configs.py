"""Every run config in configs/ parses and builds its model (on the meta device for the large sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zarvan_dist.models import build_model
from zarvan_dist.training.config import load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIGS = (sorted(CONFIGS.glob("runs/*.yaml")) + sorted(CONFIGS.glob("quickstart*.yaml"))
               + [CONFIGS / "mixture-example.yaml"])


def test_there_is_a_run_config_for_every_named_model_size():
    models = {p.stem for p in CONFIGS.glob("models/*.yaml")}
    runs = {p.stem for p in CONFIGS.glob("runs/*.yaml")}
    assert models and runs == models


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_run_config_parses_and_builds(path):
    cfg = load_run_config(path)
    assert cfg.model.causal and cfg.train.steps > 0 and cfg.data.rows > 0
    device = "cpu" if "debug" in path.stem or path.stem.startswith(("quickstart", "mixture")) else "meta"
    with torch.device(device):
        model = build_model(cfg.model)
    assert model.num_params() > 0
    if device == "cpu":
        ids = torch.randint(0, cfg.model.vocab_size, (2, 8))
        assert torch.isfinite(model(ids).logits).all()
