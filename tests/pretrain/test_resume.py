"""A run killed, signalled or left with a corrupt checkpoint, then resumed, equals one never stopped, bit for bit."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import run_config, start_trainer
from pretrain.train import REQUEUE_EXIT_CODE, Trainer
from zarvan_dist.training.checkpoint import LATEST, TMP_PREFIX, checkpoint_name, verify
from zarvan_dist.training.config import load_run_config

STEPS = 16
# Small, but with everything a resume must restore: DataLoader workers, state carried across
# windows and steps (grad_accum 2), a cosine schedule that depends on train.steps, evaluation
# records, dropout (the RNG state must be restored and nothing else may draw from it), and
# checkpoints every 2 steps so that a kill usually loses a step.
SECTIONS = dict(
    model={"dropout": 0.1},
    data={"workers": 2, "prefetch": 2},
    train={"steps": STEPS, "grad_accum": 2},
    checkpoint={"every": 2, "keep": 2},
    eval={"every": 6, "rows": 2, "steps": 3},
    logging={"every": 3, "peak_tflops": 0.1, "progress": False, "tensorboard": False},
)
# Every step's record fields that do not depend on the clock or the machine.
DETERMINISTIC = ("loss", "lr", "grad_norm", "tokens", "skipped_steps")
RESUMED = re.compile(r"resumed from (\S+): step (\d+),")
TIMEOUT = 180


def _new_run(tmp_path: Path, name: str, data_dir: Path, **sections) -> Path:
    """The config of a run in ``tmp_path/name`` (its run_dir is ``tmp_path/name/run``)."""
    home = tmp_path / name
    home.mkdir()
    return run_config(home, data_dir, **{**SECTIONS, **sections})


def _run_dir(config: Path) -> Path:
    return config.parent / "run"


def _kill_groups(pgids: list[int]) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def groups():
    """Process groups of the trainers a test starts; whatever is still alive at the end is killed."""
    started: list[int] = []
    yield started
    _kill_groups(started)


def _start(config: Path, groups: list[int], *overrides: str) -> subprocess.Popen:
    # A session of its own: the trainer and its DataLoader workers form one process group.
    proc = start_trainer(config, config.parent, *overrides, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    groups.append(proc.pid)
    return proc


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    """Wait for the trainer; then none of its processes (the workers) may be left running."""
    out, err = proc.communicate(timeout=TIMEOUT)
    _wait_group_gone(proc.pid)
    return out, err


def _run(config: Path, groups: list[int], *overrides: str) -> tuple[str, str]:
    proc = _start(config, groups, *overrides)
    out, err = _finish(proc)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out, err


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, read from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    # A DataLoader worker whose parent died notices within ~5 s (torch's watchdog interval).
    deadline = time.monotonic() + timeout
    while alive := _group_alive(pgid):
        assert time.monotonic() < deadline, f"processes {alive} of the trainer's group {pgid} are still running"
        time.sleep(0.1)


def _metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The step records and the evaluation records of ``run_dir/metrics.jsonl``."""
    train, val = [], []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        (train if "loss" in record else val).append(record)
    return train, val


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Poll metrics.jsonl until the record of optimizer step ``step`` is there."""
    deadline = time.monotonic() + TIMEOUT
    while not any(r["step"] >= step for r in _metrics(run_dir)[0]):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the trainer ended (exit {proc.returncode}) before step {step}\n{out}\n{err}")
        assert time.monotonic() < deadline, f"no step {step} in {TIMEOUT} s"
        time.sleep(0.005)


def _resumed_from(stdout: str) -> tuple[Path, int]:
    found = RESUMED.search(stdout)
    assert found, f"no 'resumed from' line in:\n{stdout}"
    return Path(found[1]), int(found[2])


def _assert_equal_tree(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_checkpoint(got: Path, want: Path) -> None:
    """Weights, lane states, optimizer state and counters of two checkpoints are bit-for-bit equal."""
    for name in ("model.safetensors", "lanes.safetensors", "rng.safetensors"):
        _assert_equal_tree(load_file(got / name), load_file(want / name), name)
    _assert_equal_tree(torch.load(got / "optimizer.pt", weights_only=True),
                       torch.load(want / "optimizer.pt", weights_only=True), "optimizer.pt")
    assert json.loads((got / "trainer.json").read_text()) == json.loads((want / "trainer.json").read_text())


def _assert_same_run(run_dir: Path, ref_dir: Path, steps: int = STEPS) -> None:
    """Every step exactly once with the reference's exact values, the same evaluations, the same end."""
    train, val = _metrics(run_dir)
    ref_train, ref_val = _metrics(ref_dir)
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert [r["step"] for r in ref_train] == list(range(1, steps + 1))
    for got, want in zip(train, ref_train):
        assert {k: got[k] for k in DETERMINISTIC} == {k: want[k] for k in DETERMINISTIC}, f"step {got['step']}"
    assert val and val == ref_val
    final = checkpoint_name(steps)
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == final
    _assert_same_checkpoint(run_dir / "checkpoints" / final, ref_dir / "checkpoints" / final)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.fixture(scope="module")
def reference(token_dataset, tmp_path_factory):
    """A function returning the run_dir of the uninterrupted run, which runs beside the first test using it."""
    config = _new_run(tmp_path_factory.mktemp("reference"), "uninterrupted", token_dataset)
    started: list[int] = []
    proc = _start(config, started)

    def finished() -> Path:
        if proc.returncode is None:
            out, err = _finish(proc)
            assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
        return _run_dir(config)

    yield finished
    _kill_groups(started)


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(reference, token_dataset, tmp_path,
                                                                          groups):
    # Past step 2 (so a checkpoint exists) and short of the end (so something is left to redo).
    kill_at = random.Random(1).randint(3, STEPS - 3)
    config = _new_run(tmp_path, "killed", token_dataset)
    run_dir = _run_dir(config)
    proc = killed = _start(config, groups)
    _wait_for_step(proc, run_dir, kill_at)
    assert len(_group_alive(proc.pid)) >= 3, "the trainer and its 2 DataLoader workers are running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    logged = _metrics(run_dir)[0][-1]["step"]
    assert kill_at <= logged < STEPS, f"killed at step {logged}"

    out, _ = _run(config, groups)
    path, step = _resumed_from(out)
    assert path == run_dir / "checkpoints" / checkpoint_name(step)
    assert 2 <= step <= logged, f"killed after step {logged}, resumed from step {step}"
    # The killed trainer's workers, orphaned, exit on their own.
    _wait_group_gone(killed.pid)
    _assert_same_run(run_dir, reference())


def _signal_mid_run(config: Path, groups: list[int], signum: int, send) -> tuple[Path, int]:
    """Start a run, ``send(pid, signum)`` at a random step; check exit 75 and the checkpoint of the
    step it stopped at. Returns that checkpoint and step."""
    signal_at = random.Random(int(signum)).randint(3, STEPS - 5)
    run_dir = _run_dir(config)
    ckpts = run_dir / "checkpoints"
    proc = _start(config, groups)
    _wait_for_step(proc, run_dir, signal_at)
    send(proc.pid, signum)
    out, err = _finish(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, f"exit {proc.returncode}\n{out}\n{err}"
    stopped = _metrics(run_dir)[0][-1]["step"]
    assert signal_at <= stopped < STEPS
    path = ckpts / checkpoint_name(stopped)
    assert f"signal {signal.Signals(signum).name}: checkpoint {path} written" in out
    assert (ckpts / LATEST).read_text().strip() == path.name
    assert verify(path)["step"] == stopped
    assert json.loads((path / "trainer.json").read_text())["step"] == stopped
    return path, stopped


def test_sigterm_checkpoints_the_current_step_exits_75_and_resumes_exactly(reference, token_dataset, tmp_path,
                                                                          groups):
    config = _new_run(tmp_path, "signalled", token_dataset)
    # As a scheduler does: every process of the job gets it; the DataLoader workers must ignore it.
    path, stopped = _signal_mid_run(config, groups, signal.SIGTERM, os.killpg)
    out, _ = _run(config, groups)
    assert _resumed_from(out) == (path, stopped)
    _assert_same_run(_run_dir(config), reference())


def test_sigusr1_checkpoints_the_current_step_and_exits_75(reference, token_dataset, tmp_path, groups):
    config = _new_run(tmp_path, "signalled", token_dataset)
    _, stopped = _signal_mid_run(config, groups, signal.SIGUSR1, os.kill)
    train, ref_train = _metrics(_run_dir(config))[0], _metrics(reference())[0]
    assert [r["loss"] for r in train] == [r["loss"] for r in ref_train[:stopped]]


def test_truncated_newest_checkpoint_is_skipped_with_a_warning_and_the_previous_one_resumed(token_dataset,
                                                                                            tmp_path, groups):
    # A constant schedule, so that a 12-step run continued to 16 steps is the 16-step run.
    constant = {"lr": 1e-3, "warmup_steps": 2, "schedule": "constant"}
    short = _new_run(tmp_path, "short", token_dataset, optim=constant, train={"steps": 12, "grad_accum": 2})
    full = _new_run(tmp_path, "full", token_dataset, optim=constant)
    procs = [_start(short, groups), _start(full, groups)]
    for proc in procs:
        out, err = _finish(proc)
        assert proc.returncode == 0, f"{out}\n{err}"
    ckpts = _run_dir(short) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST, checkpoint_name(10), checkpoint_name(12)]
    newest = ckpts / checkpoint_name(12) / "model.safetensors"
    os.truncate(newest, newest.stat().st_size // 2)

    out, err = _run(short, groups, "train.steps=16")
    assert f"skipping checkpoint {ckpts / checkpoint_name(12)}" in err
    assert "truncated" in err
    assert _resumed_from(out) == (ckpts / checkpoint_name(10), 10)
    _assert_same_run(_run_dir(short), _run_dir(full), 16)


def test_opening_the_lanes_and_evaluating_draw_nothing_from_the_global_rng(token_dataset, tmp_path):
    # A resumed run opens the train lanes once more than an uninterrupted one; with dropout the
    # two agree only if that (and evaluation) leaves the RNG state the checkpoint restores alone.
    trainer = Trainer(load_run_config(run_config(tmp_path, token_dataset)))
    before = torch.get_rng_state()
    next(trainer.train_batches())
    trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), before)
