"""Engine settings: the DeepSpeed config a run makes, and the errors that name the key at fault."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from run_helpers import ROOT, run_config, trainer_env
from zarvan_dist.config import ConfigError
from zarvan_dist.training.config import load_run_config
from zarvan_dist.training.engines import deepspeed_config, init_distributed, launcher_env


def _cfg(tmp_path, token_dataset, *overrides):
    return load_run_config(run_config(tmp_path, token_dataset), list(overrides))


def _ds(cfg, world, load_universal=False):
    """The DeepSpeed config build_engine gives the run ``cfg`` in a world of ``world`` ranks."""
    return deepspeed_config(cfg.deepspeed, cfg.data.rows // world, world, cfg.train.grad_accum, cfg.optim.grad_clip,
                            load_universal)


def test_the_deepspeed_config_takes_batch_accumulation_and_clipping_from_the_run(tmp_path, token_dataset):
    cfg = _cfg(tmp_path, token_dataset, "engine=deepspeed", "deepspeed.zero_stage=3", "data.rows=8",
               "train.grad_accum=4", "optim.grad_clip=0.5", "deepspeed.offload_optimizer=true",
               "deepspeed.offload_params=true")
    ds = _ds(cfg, world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 32 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the run's torch AdamW steps the offloaded state
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "checkpoint" not in ds and _ds(cfg, 2, load_universal=True)["checkpoint"]["load_universal"]


def test_a_deepspeed_config_file_is_the_base_and_the_run_corrects_its_batch_sizes(tmp_path, token_dataset, capsys):
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 99, "zero_optimization": {"stage": 2, "overlap_comm": True},
        "wall_clock_breakdown": True}))
    cfg = _cfg(tmp_path, token_dataset, "engine=deepspeed", "deepspeed.config=ds.json")  # relative to the config
    ds = _ds(cfg, world=1)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}  # the run's stage (default 1) wins
    assert ds["wall_clock_breakdown"] is True and ds["train_micro_batch_size_per_gpu"] == 4
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu=99 replaced by 4" in err
    assert "zero_optimization.stage=2 replaced by deepspeed.zero_stage=1" in err


@pytest.mark.parametrize("content, message", [
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ([1, 2], "does not hold a mapping"),
])
def test_a_deepspeed_config_file_that_cannot_be_used_is_an_error_naming_it(tmp_path, token_dataset, content, message):
    (tmp_path / "ds.json").write_text(json.dumps(content))
    cfg = _cfg(tmp_path, token_dataset, "engine=deepspeed", "deepspeed.config=ds.json")
    with pytest.raises(ConfigError, match=message):
        _ds(cfg, world=1)


def test_deepspeed_settings_that_cannot_work_name_the_key(tmp_path, token_dataset):
    with pytest.raises(ConfigError, match="zero_stage: expected 0, 1, 2 or 3"):
        _cfg(tmp_path, token_dataset, "deepspeed.zero_stage=4")
    cfg = _cfg(tmp_path, token_dataset, "engine=deepspeed", "deepspeed.zero_stage=2", "deepspeed.offload_params=true")
    with pytest.raises(ConfigError, match="offload_params: parameter offload needs ZeRO stage 3"):
        _ds(cfg, world=1)
    with pytest.raises(ConfigError, match="engine"):
        _cfg(tmp_path, token_dataset, "engine=megatron")


def test_engine_single_refuses_a_launcher_world_larger_than_one(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launcher_env().world == 2
    import torch

    with pytest.raises(ConfigError, match="engine: single trains in one process, but the launcher started WORLD_SIZE=2"):
        init_distributed("single", torch.device("cpu"))


def test_rows_that_do_not_divide_among_the_ranks_fail_naming_data_rows(tmp_path, token_dataset):
    config = run_config(tmp_path, token_dataset, data={"rows": 3, "workers": 0}, eval={"rows": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pretrain", "--config", str(config), "--set", "engine=ddp"]
    done = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error: data.rows: the 3 rows of the global batch do not divide among 2 ranks" in done.stderr
