"""What a resume refuses or repairs: other lanes, an explicit older checkpoint, a fresh start's old events."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.train import Trainer
from run_helpers import run_config
from zarvan_dist.config import ConfigError
from zarvan_dist.training.checkpoint import LATEST, checkpoint_name
from zarvan_dist.training.config import load_run_config

SECTIONS = dict(train={"steps": 4, "grad_accum": 1}, checkpoint={"every": 2, "keep": 3},
                eval={"every": 0, "rows": 2, "steps": 1}, logging={"every": 2, "progress": False})


def _train(config, *overrides: str) -> Trainer:
    trainer = Trainer(load_run_config(config, list(overrides)))
    assert trainer.fit() == 0
    return trainer


@pytest.mark.parametrize("override, key", [("data.rotation_seed=5", "data.rotation_seed"),
                                           ("data.rows=2", "data.rows")])
def test_resuming_on_other_lanes_is_refused_naming_the_key(token_dataset, tmp_path, override, key):
    config = run_config(tmp_path, token_dataset, **SECTIONS)
    _train(config)
    with pytest.raises(ConfigError, match=key):
        Trainer(load_run_config(config, [override, "train.steps=6"])).fit()


def test_an_explicit_older_checkpoint_becomes_latest(token_dataset, tmp_path):
    config = run_config(tmp_path, token_dataset, **SECTIONS)
    _train(config)
    root = tmp_path / "run" / "checkpoints"
    older = root / checkpoint_name(2)
    assert (root / LATEST).read_text().strip() == checkpoint_name(4)
    trainer = Trainer(load_run_config(config, [f"checkpoint.resume={older}"]))
    assert trainer.resume() == 2
    # a requeue with --resume auto must continue this run, not the abandoned step 4
    assert (root / LATEST).read_text().strip() == checkpoint_name(2)


def test_a_fresh_start_purges_the_old_tensorboard_events(token_dataset, tmp_path):
    config = run_config(tmp_path, token_dataset, **SECTIONS)
    _train(config)
    _train(config, "checkpoint.resume=none")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
