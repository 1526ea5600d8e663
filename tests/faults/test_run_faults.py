"""Faults of a training run, injected into small runs: each ends the job fast with one clear message (or
recovers), and nothing is lost: ``latest``, the checkpoints and ``metrics.jsonl`` stay intact.

Damaged checkpoints (every one; one whose files verify but cannot be read), a changed model, another
dataset, a full disk while checkpointing, Ctrl-C (once, twice), SIGTERM when an evaluation is due,
and a second trainer on the same run directory (alive, killed, on another host).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pretrain.train import INTERRUPT_EXIT_CODE, Trainer, main
from tests.pretrain.run_helpers import VOCAB, SEQ_LEN, run_config, start_trainer, trainer_env
from tests.pretrain.token_data import write_token_dataset
from zarvan_dist.training.checkpoint import LATEST, checkpoint_name
from zarvan_dist.training.config import load_run_config
from zarvan_dist.training.lock import LOCK_FILE, RunLock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dataset(token_dataset) -> Path:
    return token_dataset


def _config(tmp_path: Path, dataset: Path, **sections) -> Path:
    base = dict(train={"steps": 6, "grad_accum": 1}, checkpoint={"every": 2, "keep": 3},
                eval={"every": 3, "rows": 2, "steps": 2}, logging={"every": 1, "tensorboard": False, "progress": False})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return run_config(tmp_path, dataset, **base)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


def test_when_every_checkpoint_is_damaged_the_run_stops_listing_them_and_prunes_nothing(dataset, tmp_path, capsys):
    config = _config(tmp_path, dataset)
    assert main(["--config", str(config)]) == 0
    run = tmp_path / "run"
    for step in (2, 4, 6):
        weights = run / "checkpoints" / checkpoint_name(step) / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    before = _snapshot(run)
    with pytest.warns(UserWarning):
        assert main(["--config", str(config), "--set", "train.steps=8"]) == 1
    line = _error_line(capsys)
    assert "no checkpoint can be resumed" in line and "nothing was pruned" in line and "--resume none" in line
    for step in (2, 4, 6):
        assert f"{checkpoint_name(step)}: " in line
    assert _snapshot(run) == before, "no checkpoint, latest or metrics record was touched"


def test_a_checkpoint_that_verifies_but_cannot_be_read_is_passed_over(dataset, tmp_path):
    """A safetensors header damaged before meta.json was written (so the sha256 agrees): the run resumes
    from the checkpoint before it, with a warning, and goes on to the end."""
    config = _config(tmp_path, dataset)
    assert Trainer(load_run_config(config, ["train.steps=4"])).fit() == 0
    run = tmp_path / "run"
    newest = run / "checkpoints" / checkpoint_name(4)
    lanes = newest / "lanes.safetensors"
    lanes.write_bytes(b"\xff" * 8 + lanes.read_bytes()[8:])  # the header length: nonsense
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"]["lanes.safetensors"]["sha256"] = hashlib.sha256(lanes.read_bytes()).hexdigest()
    (newest / "meta.json").write_text(json.dumps(meta))
    trainer = Trainer(load_run_config(config))
    with pytest.warns(UserWarning, match=rf"{newest} cannot be resumed \(cannot load it \(rank 0: SafetensorError"):
        assert trainer.fit() == 0
    assert trainer.counters.step == 6
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == 6


def test_a_changed_model_is_refused_naming_the_key_and_both_values(dataset, tmp_path, capsys):
    config = _config(tmp_path, dataset, train={"steps": 2})
    assert main(["--config", str(config)]) == 0
    assert main(["--config", str(config), "--set", "train.steps=4", "--set", "model.d_model=48"]) == 1
    line = _error_line(capsys)
    assert "model.d_model: 32 in the checkpoint, 48 now" in line and "--resume none" in line


def test_a_resume_on_another_dataset_is_refused_unless_allowed(dataset, tmp_path, capsys):
    config = _config(tmp_path, dataset, train={"steps": 2})
    assert main(["--config", str(config)]) == 0
    other = tmp_path / "other"
    rng = np.random.default_rng(4)  # the same window count, other tokens
    m = json.loads((dataset / "manifest.json").read_text())
    write_token_dataset(other, {"train": rng.integers(4, VOCAB, m["splits"]["train"]["tokens"]),
                                "val": rng.integers(4, VOCAB, m["splits"]["val"]["tokens"])}, SEQ_LEN, VOCAB, 10)
    args = ["--config", str(config), "--set", "train.steps=4", "--set", f"data.dir={other}"]
    assert main(args) == 1
    line = _error_line(capsys)
    assert f"data.dir: the checkpoint {tmp_path / 'run' / 'checkpoints' / checkpoint_name(2)}" in line
    assert "checkpoint.allow_other_data: true" in line
    assert main(args + ["--set", "checkpoint.allow_other_data=true"]) == 0


def test_a_full_disk_while_checkpointing_is_one_line_and_latest_stays(dataset, tmp_path, capsys, monkeypatch):
    config = _config(tmp_path, dataset, train={"steps": 4})
    assert main(["--config", str(config), "--set", "train.steps=2"]) == 0
    run = tmp_path / "run"
    import zarvan_dist.training.checkpoint as checkpoint

    def full(path, tensors):  # what torch's writer raises on ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176")

    monkeypatch.setattr(checkpoint, "save_tensors", full)
    assert main(["--config", str(config)]) == 1
    line = _error_line(capsys)
    assert f"cannot write checkpoint {checkpoint_name(4)} in {run / 'checkpoints'}" in line
    assert "inline_container.cc" in line and f"latest stays {checkpoint_name(2)}" in line
    assert (run / "checkpoints" / LATEST).read_text().strip() == checkpoint_name(2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [LATEST, checkpoint_name(2)]
    monkeypatch.undo()
    assert main(["--config", str(config)]) == 0  # and the run goes on from step 2
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _step_logged(run: Path, step: int):
    def logged() -> bool:
        try:
            return any(r.get("step", 0) >= step for r in _records(run))
        except (OSError, ValueError):
            return False
    return logged


def test_ctrl_c_checkpoints_and_exits_130_and_a_second_one_stops_at_once(dataset, tmp_path):
    config = _config(tmp_path, dataset, train={"steps": 100000}, checkpoint={"every": 100000})
    run = tmp_path / "run"
    proc = start_trainer(config, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(_step_logged(run, 2), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPT_EXIT_CODE, err
    assert "signal SIGINT: checkpoint" in out and "exiting with 130" in out
    step = int((run / "checkpoints" / LATEST).read_text().strip().split("-")[1])
    assert step >= 2 and "Traceback" not in err

    proc = start_trainer(config, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(_step_logged(run, step + 2), proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPT_EXIT_CODE and time.monotonic() - started < 30
    if "interrupted twice" in err:  # the second came before the first was acted on: no new checkpoint
        assert (run / "checkpoints" / LATEST).read_text().strip() == checkpoint_name(step)


def test_an_evaluation_a_stop_skipped_runs_after_the_resume(dataset, tmp_path):
    """SIGTERM arrives as an evaluation falls due: the checkpoint is taken at once, and the resumed run
    evaluates that step before it trains on; no val record is lost."""
    config = _config(tmp_path, dataset, train={"steps": 6}, eval={"every": 3})
    run = tmp_path / "run"
    trainer = Trainer(load_run_config(config))
    train_step = trainer.train_step

    def stop_before_the_evaluation(batches):
        record = train_step(batches)
        if trainer.counters.step == 3:
            trainer.stop_signal = signal.SIGTERM
        return record

    trainer.train_step = stop_before_the_evaluation
    assert trainer.fit() == 75
    assert not any("val_loss" in r for r in _records(run))
    info = json.loads((run / "checkpoints" / checkpoint_name(3) / "trainer.json").read_text())
    assert info["pending_eval"] == 3
    assert Trainer(load_run_config(config)).fit() == 0
    assert [r["step"] for r in _records(run) if "val_loss" in r] == [3, 6]
    reference = tmp_path / "reference"
    reference.mkdir()
    assert Trainer(load_run_config(_config(reference, dataset, train={"steps": 6}, eval={"every": 3}))).fit() == 0
    want = {r["step"]: r["val_loss"] for r in _records(reference / "run") if "val_loss" in r}
    got = {r["step"]: r["val_loss"] for r in _records(run) if "val_loss" in r}
    assert got == pytest.approx(want, rel=1e-6)


def test_a_second_trainer_on_the_run_directory_is_refused_and_a_dead_holder_is_taken_over(dataset, tmp_path):
    config = _config(tmp_path, dataset, train={"steps": 100000}, checkpoint={"every": 100000})
    run = tmp_path / "run"
    first = start_trainer(config, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(_step_logged(run, 1), first)
    before = (run / "metrics.jsonl").read_text()
    second = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config)], cwd=ROOT,
                            env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"{run} is in use by another trainer (pid {first.pid} on {socket.gethostname()}" in second.stderr
    assert (run / "metrics.jsonl").read_text().startswith(before), "the refused trainer touched nothing"
    first.kill()  # SIGKILL: the lock stays behind, its pid gone
    first.wait()
    assert (run / LOCK_FILE).is_file()
    third = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config), "--set", "train.steps=2"],
                           cwd=ROOT, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert not (run / LOCK_FILE).exists(), "released at the end"


def test_a_lock_from_another_host_needs_break_lock(dataset, tmp_path, capsys):
    config = _config(tmp_path, dataset, train={"steps": 2})
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 4242, "slurm_job_id": None,
                                             "started": "2026-12-01T10:00:00+0000"}) + "\n")
    assert main(["--config", str(config)]) == 1
    line = _error_line(capsys)
    assert "pid 4242 on node-17" in line and "--break-lock" in line
    assert main(["--config", str(config), "--break-lock"]) == 0
    assert not (run / LOCK_FILE).exists()
    lock = RunLock(run)  # and a requeued SLURM job takes its own lock over on any host
    (run / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 4242, "slurm_job_id": "991"}) + "\n")
    os.environ["SLURM_JOB_ID"] = "991"
    try:
        lock.acquire()
    finally:
        del os.environ["SLURM_JOB_ID"]
    assert lock.holder()["pid"] == os.getpid()
    lock.release()


def test_an_unexpected_error_is_one_line_naming_the_rank(dataset, tmp_path, capsys, monkeypatch):
    """An engine's own failure (here out of memory in the backward pass) ends the run with one line and exit
    1; the traceback is printed only when asked for."""
    from zarvan_dist.training.engines import Engine

    config = _config(tmp_path, dataset, train={"steps": 4})

    def out_of_memory(self, loss, last):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(GPU 0; 79.1 GiB total capacity)")

    monkeypatch.setattr(Engine, "backward", out_of_memory)
    assert main(["--config", str(config)]) == 1
    line = _error_line(capsys)
    assert line.startswith("error: rank 0: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0;")
    assert "ZARVAN_TRACEBACK=1" in line
    monkeypatch.setenv("ZARVAN_TRACEBACK", "1")
    assert main(["--config", str(config)]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
