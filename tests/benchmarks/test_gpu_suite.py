"""benchmarks/gpu_suite.py runs end to end where deepspeed, webdataset and faiss are missing (--smoke, CPU):
every phase reaches the report, the time budget skips what would start after it (not its speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WITHOUT = ("import runpy, sys\n"
           "for name in ('deepspeed', 'webdataset', 'faiss'):\n"
           "    sys.modules[name] = None  # import fails as if not installed\n"
           "sys.argv = ['gpu_suite.py'] + sys.argv[1:]\n"
           "runpy.run_path('benchmarks/gpu_suite.py', run_name='__main__')\n")


def run_suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    return subprocess.run([sys.executable, "-c", WITHOUT, "--smoke", "--device", "cpu", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_the_suite_writes_every_phase_to_its_report_without_deepspeed_webdataset_or_faiss(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    done = run_suite(tmp_path, "--out", str(out), "--archs", "zarvan", "sdpa-gpt")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    trained = {(r["arch"], r["context"], r["mode"]) for r in data["train"] if r["tokens_per_s"] > 0}
    assert trained == {(a, c, m) for a in ("zarvan", "sdpa-gpt") for c in (64, 256) for m in ("eager", "compiled")}
    assert set(data["decode"]) == {"zarvan"} and all(v > 0 for v in data["decode"]["zarvan"].values())
    forms = {(r["op"], r["form"]) for r in data["ops"]}
    assert ("prefix_softmax_pool S=E", "compiled") in forms and ("prefix_sum", "naive") in forms
    report = (out / "gpu_suite.md").read_text()
    assert "| zarvan | 256 | compiled |" in report and "zarvan / sdpa-gpt tokens/s" in report
    assert (out / "gpu_suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not data["skipped"]


def test_items_that_would_start_after_the_budget_are_listed_as_skipped(tmp_path):
    out = tmp_path / "report"
    done = run_suite(tmp_path, "--out", str(out), "--budget-s", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    assert not data["train"] and not data["ops"]
    assert "train zarvan context 64 eager" in data["skipped"] and "train sdpa-gpt context 256 compiled" in data["skipped"]
    assert "## Skipped (time budget)" in (out / "gpu_suite.md").read_text()
