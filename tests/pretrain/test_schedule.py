"""The learning rate is a pure function of the step; the run config names the key of every error,
takes ``--set`` overrides and resolves ``model_file`` beside itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from pretrain.train import main
from run_helpers import run_config
from zarvan_dist.config import ConfigError
from zarvan_dist.training.config import OptimConfig, load_run_config
from zarvan_dist.training.schedule import learning_rate

TOTAL = 100


def lrs(cfg: OptimConfig, total: int = TOTAL) -> np.ndarray:
    return np.array([learning_rate(step, total, cfg) for step in range(total)])


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_rises_linearly_to_the_peak(schedule):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, schedule=schedule, warmup_steps=10)
    lr = lrs(cfg)
    warm = lr[:10]
    assert warm[0] > 0 and np.all(np.diff(warm) > 0)
    np.testing.assert_allclose(np.diff(warm), cfg.lr / 11, rtol=1e-9)  # equal increments: linear
    np.testing.assert_allclose(warm, cfg.lr * np.arange(1, 11) / 11, rtol=1e-12)
    assert lr[10] == pytest.approx(cfg.lr)  # the first step after warmup is at the peak
    assert lr.max() == pytest.approx(cfg.lr)


def test_cosine_is_monotone_after_warmup_and_reaches_min_lr_at_the_last_step():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=10)
    lr = lrs(cfg)
    after = lr[10:]
    assert np.all(np.diff(after) <= 0)
    assert np.all(np.diff(after)[1:-1] < 0)  # strictly decreasing in between
    assert lr[-1] == pytest.approx(cfg.min_lr, rel=1e-12)
    assert after.min() >= cfg.min_lr - 1e-15
    # halfway through the decay the cosine is at the mean of lr and min_lr
    mid = 10 + (TOTAL - 1 - 10) / 2
    assert learning_rate(int(mid), TOTAL, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=0.05)


def test_wsd_holds_the_peak_then_decays_linearly_to_min_lr_over_the_last_fraction():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="wsd", warmup_steps=10, decay_fraction=0.2)
    lr = lrs(cfg)
    decay = round(0.2 * TOTAL)
    stable = lr[10:TOTAL - decay]
    np.testing.assert_array_equal(stable, cfg.lr)
    tail = lr[TOTAL - decay:]
    assert np.all(tail < cfg.lr)
    steps = np.diff(lr[TOTAL - decay - 1:])
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)  # linear
    assert steps[0] < 0
    assert lr[-1] == pytest.approx(cfg.min_lr, rel=1e-12)


def test_constant_holds_the_peak_after_warmup():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="constant", warmup_steps=5)
    np.testing.assert_array_equal(lrs(cfg)[5:], cfg.lr)
    assert learning_rate(0, TOTAL, OptimConfig(lr=2e-3, schedule="constant", warmup_steps=0)) == 2e-3


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_the_learning_rate_is_a_pure_function_of_the_step(schedule):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, schedule=schedule, warmup_steps=7)
    forward = lrs(cfg)
    backward = np.array([learning_rate(step, TOTAL, cfg) for step in reversed(range(TOTAL))])[::-1]
    again = np.array([learning_rate(step, TOTAL, OptimConfig(**vars(cfg))) for step in range(TOTAL)])
    np.testing.assert_array_equal(forward, backward)
    np.testing.assert_array_equal(forward, again)
    assert all(math.isfinite(x) and x > 0 for x in forward)


# ---- the run config


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("key", "value", "named"), [
    ("train.steps", 0, "train.steps"),
    ("train.steps", "ten", "train.steps"),
    ("train.grad_accum", 1.5, "train.grad_accum"),
    ("train.carry_state", "maybe", "train.carry_state"),
    ("train.dtype", "float16", "train.dtype"),
    ("optim.betas", [0.9], "optim.betas"),
    ("optim.betas", [0.9, 1.5], "optim.betas"),
    ("optim.schedule", "linear", "optim.schedule"),
    ("optim.decay_fraction", 0.0, "optim.decay_fraction"),
    ("data.rows", 0, "data.rows"),
    ("data.workers", -1, "data.workers"),
    ("checkpoint.every", -1, "checkpoint.every"),
    ("logging.peak_tflops", 0, "logging.peak_tflops"),
    ("train.stepz", 3, "train.stepz"),
    ("optim.momentum", 0.9, "optim.momentum"),
    ("optim.min_lr", 1.0, "optim.min_lr"),
    ("optim.weight_decay", -0.1, "optim.weight_decay"),
    ("eval.steps", -1, "eval.steps"),
])
def test_a_bad_value_or_an_unknown_key_is_an_error_naming_the_dotted_key(tmp_path, key, value, named):
    path = run_config(tmp_path, tmp_path / "data")
    data = yaml.safe_load(path.read_text())
    section, name = key.split(".")
    data[section][name] = value
    _write(path, data)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert named in str(err.value) and str(path) in str(err.value)
    # the same through a --set override
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_run_config(run_config(tmp_path, tmp_path / "data"), [f"{key}={json.dumps(value)}"])


def test_an_unknown_top_level_key_and_a_malformed_override_are_named(tmp_path):
    path = run_config(tmp_path, tmp_path / "data", trian={"steps": 3})
    with pytest.raises(ConfigError, match="trian"):
        load_run_config(path)
    good = run_config(tmp_path, tmp_path / "data")
    with pytest.raises(ConfigError, match="train.steps"):
        load_run_config(good, ["train.steps"])
    with pytest.raises(ConfigError, match="'train' is not a section|train.steps"):
        load_run_config(good, ["train=3", "train.steps=4"])


def test_set_overrides_run_dir_data_dir_steps_and_checkpoint_every(tmp_path):
    path = run_config(tmp_path, tmp_path / "data")
    cfg = load_run_config(path, [f"run_dir={tmp_path / 'elsewhere'}", f"data.dir={tmp_path / 'other'}",
                                 "train.steps=7", "checkpoint.every=3", "optim.lr=2e-3", "optim.betas=[0.8, 0.9]"])
    assert cfg.run_dir == str(tmp_path / "elsewhere")
    assert cfg.data.dir == str(tmp_path / "other")
    assert cfg.train.steps == 7 and cfg.checkpoint.every == 3
    assert cfg.optim.lr == 2e-3 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.grad_accum == 2  # untouched keys keep the file's values


def test_set_overrides_drive_a_real_run(token_dataset, tmp_path, capsys):
    # the file points at a run dir and a dataset that do not exist: the overrides must win
    path = run_config(tmp_path, tmp_path / "missing-data", logging={"every": 1, "tensorboard": False})
    run_dir = tmp_path / "overridden"
    status = main(["--config", str(path), "--set", f"run_dir={run_dir}", "--set", f"data.dir={token_dataset}",
                   "--set", "train.steps=3", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=5",
                   "--set", "eval.every=0"])
    assert status == 0, capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000001", "step-00000002", "step-00000003"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["dir"] == str(token_dataset) and saved["train"]["steps"] == 3


def test_model_file_resolves_beside_the_run_config_and_inline_keys_override_it(tmp_path, monkeypatch):
    _write(tmp_path / "configs/models/small.yaml",
           {"arch": "zarvan", "vocab_size": 100, "d_model": 32, "n_layers": 3, "n_heads": 2, "chunk_size": 8})
    run = {"run_dir": str(tmp_path / "run"), "model_file": "models/small.yaml",
           "model": {"n_layers": 1, "dropout": 0.1}}
    path = _write(tmp_path / "configs/run.yaml", run)
    monkeypatch.chdir(tmp_path)  # relative to the config, not to the working directory
    cfg = load_run_config(path)
    assert cfg.model.arch == "zarvan" and cfg.model.d_model == 32 and cfg.model.vocab_size == 100
    assert cfg.model.n_layers == 1 and cfg.model.dropout == 0.1
    # overrides of the model keys win over both
    assert load_run_config(path, ["model.n_layers=2"]).model.n_layers == 2
    # an absolute model_file, and one given by --set
    _write(tmp_path / "elsewhere/big.yaml", {"arch": "zarvan", "vocab_size": 100, "d_model": 48, "n_heads": 2})
    cfg = load_run_config(path, [f"model_file={tmp_path / 'elsewhere/big.yaml'}"])
    assert cfg.model.d_model == 48 and cfg.model.n_layers == 1
    # a model_file that does not exist is an error naming it
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_run_config(path, ["model_file=nope.yaml"])
    # a bad inline model key is named with its section
    with pytest.raises(ConfigError, match=r"model\.d_modle"):
        load_run_config(path, ["model.d_modle=3"])


def test_the_repository_run_configs_use_model_files_that_resolve():
    root = Path(__file__).resolve().parents[2] / "configs"
    runs = sorted(root.glob("runs/*.yaml"))
    with_file = [p for p in runs if "model_file" in yaml.safe_load(p.read_text())]
    for path in with_file:
        base = yaml.safe_load(path.read_text())["model_file"]
        model = yaml.safe_load((path.parent / base).read_text())
        cfg = load_run_config(path)
        inline = yaml.safe_load(path.read_text()).get("model") or {}
        for key, value in model.items():
            if key not in inline:
                assert getattr(cfg.model, key) == value, (path, key)
