"""benchmarks/bench_generate.py runs end to end at tiny contexts: its table, ratios and plot (not its speed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_generation_benchmark_prints_its_table_and_draws_its_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    done = subprocess.run([sys.executable, "benchmarks/bench_generate.py", "--contexts", "64", "320", "--new-tokens", "2",
                           "--repeats", "1", "--warmup", "1", "--chunk", "128", "--device", "cpu", "--plot", str(plot)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    header, body = done.stdout.split("peak MiB\n", 1)
    state = {}  # (label, context) -> state MiB
    for line in body.split("\n\n", 1)[0].splitlines():
        *label, context, _params, _prefill, _ms, _tokens, state_mib, _peak = line.split()
        state[" ".join(label), int(context)] = float(state_mib)
    assert {label for label, _ in state} == {"zarvan", "nonattn", "transformer w256", "transformer full"}
    # a carried state does not grow with the context; full attention's KV cache does
    assert state["zarvan", 320] == state["zarvan", 64]
    assert state["nonattn", 320] == state["nonattn", 64]
    assert state["transformer full", 320] > 2 * state["transformer full", 64]
    assert "zarvan            context 320 / 64: ms/token x" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
