"""Monitoring: TensorBoard event files read back with tensorboard's EventAccumulator hold the named
scalars at the expected steps, equal to ``metrics.jsonl``; the console shows progress with an ETA."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.train import Trainer
from run_helpers import SEQ_LEN, run_config
from zarvan_dist.training.config import load_run_config
from zarvan_dist.training.metrics import EXPERTS

ROWS, ACCUM, STEPS, LOG_EVERY, EVAL_EVERY, LAYERS = 4, 2, 6, 2, 3, 2
LOG_STEPS = [2, 4, 6]
EVAL_STEPS = [3, 6]
PER_LOG_STEP = (["perplexity", "tokens_per_s", "mfu", "memory_gib"]
                + [f"experts/layer_{i}/{e}" for i in range(LAYERS) for e in EXPERTS]
                + [f"state_norm/layer_{i}" for i in range(LAYERS)])
PER_STEP = ["loss", "lr", "grad_norm", "tokens", "skipped_steps"]
PER_EVAL = ["val_loss", "val_perplexity"]


@pytest.fixture(scope="module")
def run(token_dataset, tmp_path_factory):
    """A short run with TensorBoard, MFU (a configured peak), evaluation and the console line; its output."""
    home = tmp_path_factory.mktemp("monitoring")
    config = run_config(home, token_dataset, data={"rows": ROWS, "workers": 0},
                        train={"steps": STEPS, "grad_accum": ACCUM}, optim={"lr": 3e-3, "warmup_steps": 1},
                        checkpoint={"every": 0}, eval={"every": EVAL_EVERY, "rows": 2, "steps": 3},
                        logging={"every": LOG_EVERY, "tensorboard": True, "peak_tflops": 0.1, "progress": True})
    trainer = Trainer(load_run_config(config))
    out = io.StringIO()  # a module-scoped fixture cannot use capsys
    with contextlib.redirect_stdout(out):
        assert trainer.fit() == 0
    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return lines, events, out.getvalue()


def test_metrics_jsonl_has_one_record_per_step_and_one_per_evaluation(run):
    lines, _, _ = run
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert len(lines) == len(steps) + len(evals)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == EVAL_STEPS
    for r in steps:
        assert set(PER_STEP) <= r.keys()
        assert all(math.isfinite(r[k]) for k in PER_STEP)
        assert (set(PER_LOG_STEP) <= r.keys()) == (r["step"] in LOG_STEPS)
    # tokens are cumulative: rows x seq_len x grad_accum more every step
    assert [r["tokens"] for r in steps] == [s * ROWS * SEQ_LEN * ACCUM for s in range(1, STEPS + 1)]
    # an evaluation's record follows its step's record
    order = [("val" if "val_loss" in r else "step", r["step"]) for r in lines]
    for step in EVAL_STEPS:
        assert order.index(("val", step)) == order.index(("step", step)) + 1
    for r in evals:
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))


def test_tensorboard_holds_the_named_scalars_equal_to_metrics_jsonl(run):
    lines, events, _ = run
    tags = set(events.Tags()["scalars"])
    for name in PER_STEP + PER_EVAL + PER_LOG_STEP:
        assert name in tags, f"{name} missing from TensorBoard (has {sorted(tags)})"
    expected_steps = {**{k: list(range(1, STEPS + 1)) for k in PER_STEP},
                      **{k: EVAL_STEPS for k in PER_EVAL}, **{k: LOG_STEPS for k in PER_LOG_STEP}}
    for name, steps in expected_steps.items():
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == steps, name
        jsonl = {r["step"]: r[name] for r in lines if name in r}
        for s in scalars:  # event files store float32
            assert s.value == pytest.approx(jsonl[s.step], rel=1e-6, abs=1e-30), (name, s.step)
    assert {t for t in tags if t.startswith("experts/")} == {
        f"experts/layer_{i}/{e}" for i in range(LAYERS) for e in EXPERTS}


def test_logged_values_are_sane(run):
    lines, _, _ = run
    last = [r for r in lines if "loss" in r][-1]
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]))
    assert last["tokens_per_s"] > 0 and 0 < last["mfu"] < 1 and last["memory_gib"] > 0
    assert last["skipped_steps"] == 0 and last["grad_norm"] > 0
    assert all(last[f"state_norm/layer_{i}"] > 0 and math.isfinite(last[f"state_norm/layer_{i}"])
               for i in range(LAYERS))
    for i in range(LAYERS):
        weights = [last[f"experts/layer_{i}/{e}"] for e in EXPERTS]
        assert all(math.isfinite(w) for w in weights)
        for a, b in itertools.combinations(weights, 2):
            assert abs(a - b) > 1e-6, (i, weights)  # the three experts are weighted differently


def test_the_console_shows_progress_with_an_eta(run):
    _, _, out = run
    progress = re.compile(r"^step (\d+)/6 \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| [\d,]+ tok/s \| "
                          r"MFU \d+\.\d\d% \| ETA (\d+:)?\d\d:\d\d$")
    shown = [int(m.group(1)) for line in out.splitlines() if (m := progress.match(line))]
    assert shown == LOG_STEPS, out
    evaluations = re.finditer(r"^step (\d+): val loss \d+\.\d{4}, perplexity", out, re.M)
    assert [int(m.group(1)) for m in evaluations] == EVAL_STEPS
    assert re.search(r"^step 6/6 .*\| ETA 00:00$", out, re.M), out  # nothing left at the last step
