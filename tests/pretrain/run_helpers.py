"""Helpers of the trainer tests: run configs and trainer subprocesses (imported, not a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

VOCAB = 64
SEQ_LEN = 16
ROOT = Path(__file__).resolve().parents[2]


def run_config(tmp_path: Path, data_dir: Path, **sections) -> Path:
    """Write a small zarvan run config under ``tmp_path``; ``sections`` update its sections."""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"arch": "zarvan", "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2,
                  "chunk_size": 8},
        "data": {"dir": str(data_dir), "rows": 4, "workers": 0},
        "train": {"steps": 12, "grad_accum": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"every": 4, "keep": 3},
        "eval": {"every": 6, "rows": 2, "steps": 3},
        "logging": {"every": 3, "peak_tflops": 0.1, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainer_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a trainer subprocess: one thread, a private TMPDIR, the repo importable."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}


def start_trainer(config: Path, tmp_path: Path, *overrides: str, **popen) -> subprocess.Popen:
    """``python -m pretrain --config config --set ...`` as a subprocess."""
    args = [sys.executable, "-m", "pretrain", "--config", str(config)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=ROOT, env=trainer_env(tmp_path), **popen)
