"""The ddp, fsdp and deepspeed engines on 2 CPU processes (torchrun, gloo) against the single-process run.

Every run here is a real subprocess: ``torchrun --standalone --nproc_per_node 2`` (or ``python -m
pretrain`` for one process) over the same small dataset, with each rank's batches recorded by
``dist_trace.py``. The uninterrupted run of each engine is made once and shared by the tests.

Tolerance of "the same loss curve": the 2-process runs sum the ranks' gradients with an
all-reduce, the single process sums the same rows inside one batched backward, so float32
additions happen in another order. One such reordering changes a value by a few ulp (~1e-7
relative); over 8 steps at lr 1e-2 the measured loss differences are below 1e-6. We assert
|Δloss| <= 2e-5: 20x the measured drift, and 100x smaller than the spread of the curve's own
step-to-step losses, so a wrong row, a lost state or a gradient averaged over the wrong count fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from run_helpers import ROOT, run_config, trainer_env
from pretrain.train import REQUEUE_EXIT_CODE
from zarvan_dist.data import LaneLayout, Manifest
from zarvan_dist.training.checkpoint import LATEST, checkpoint_name, open_checkpoint

STEPS = 8
ROWS = 4
SECTIONS = dict(
    data={"rows": ROWS, "workers": 0},
    train={"steps": STEPS, "grad_accum": 2},
    optim={"lr": 1e-2, "warmup_steps": 2},
    checkpoint={"every": 2, "keep": 10},
    eval={"every": 4, "rows": 2, "steps": 2},
    logging={"every": 2, "peak_tflops": 0.1, "progress": False, "tensorboard": False},
)
ENGINES = {
    "ddp": ["engine=ddp"],
    "fsdp": ["engine=fsdp"],
    "zero1": ["engine=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["engine=deepspeed", "deepspeed.zero_stage=2", "data.workers=1"],
    "zero3": ["engine=deepspeed", "deepspeed.zero_stage=3"],
}
LOSS_TOL = 2e-5
DETERMINISTIC = ("loss", "lr", "grad_norm", "tokens", "skipped_steps")
TRACE = Path(__file__).with_name("dist_trace.py")
TIMEOUT = 300


# ---------------------------------------------------------------- running jobs
def _env(tmp_path: Path) -> dict[str, str]:
    env = trainer_env(tmp_path)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def _command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    if nproc == 1:  # no launcher: a distributed engine runs as a world of one
        cmd = [sys.executable, str(TRACE)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(TRACE)]
    cmd += ["--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _start(nproc: int, config: Path, overrides: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(_command(nproc, config, overrides), cwd=ROOT, env={**_env(tmp_path), **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return out, err


def _killpg(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the job's whole process tree: torchrun starts each rank in a session of its own, so the
    launcher's process group does not hold the ranks (a SIGKILL to it alone would orphan them)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for pid in [proc.pid] + [p.pid for p in tree]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    psutil.wait_procs(tree, timeout=30)


def _run(nproc: int, config: Path, overrides: list[str], tmp_path: Path, **env: str) -> str:
    proc = _start(nproc, config, overrides, tmp_path, **env)
    out, err = _finish(proc)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return out


def _new_config(home: Path, data_dir: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    return run_config(home, data_dir, **SECTIONS)


def _run_dir(config: Path) -> Path:
    return config.parent / "run"


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _val_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def _trace(run_dir: Path, rank: int, split: str = "train") -> list[dict]:
    path = run_dir / f"trace-rank{rank}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def _losses(run_dir: Path, first: int = 1) -> list[float]:
    return [r["loss"] for r in _train_records(run_dir) if r["step"] >= first]


def _assert_close_curves(got: list[float], want: list[float], tol: float = LOSS_TOL) -> None:
    assert len(got) == len(want), (got, want)
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst <= tol, f"loss curves differ by {worst:.2e} > {tol:.0e}:\n{got}\n{want}"


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before step {step}\n{out[-2000:]}\n{err[-3000:]}")
        path = run_dir / "metrics.jsonl"
        if path.exists():
            steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    _killpg(proc)
    pytest.fail(f"step {step} not reached in {timeout} s")


def _resume_copy(source: Path, step: int, home: Path, data_dir: Path) -> Path:
    """A new run whose checkpoints/ holds checkpoint ``step`` of run ``source`` (latest)."""
    config = _new_config(home, data_dir)
    ckpts = _run_dir(config) / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / checkpoint_name(step), ckpts / checkpoint_name(step))
    (ckpts / LATEST).write_text(checkpoint_name(step) + "\n")
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- shared uninterrupted runs
class Runs:
    """Each uninterrupted run made once per session: ``runs.get(name, nproc)`` -> its run directory."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root, self.data_dir, self.done = root, data_dir, {}

    def get(self, name: str, nproc: int = 2) -> Path:
        key = (name, nproc)
        if key not in self.done:
            config = _new_config(self.root / f"{name}-{nproc}", self.data_dir)
            overrides = [] if name == "single" else ENGINES[name]
            _run(nproc, config, overrides, config.parent)
            self.done[key] = _run_dir(config)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(token_dataset, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), token_dataset)


# ---------------------------------------------------------------- 1. the same loss curve
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_give_the_single_process_loss_curve(runs, engine):
    single, job = runs.get("single", 1), runs.get(engine)
    _assert_close_curves(_losses(job), _losses(single))
    got, want = _train_records(job), _train_records(single)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]  # tokens counted over both ranks
    for a, b in zip(got, want):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, b["grad_norm"]), (a, b)
    _assert_close_curves([r["val_loss"] for r in _val_records(job)], [r["val_loss"] for r in _val_records(single)])
    curve = _losses(single)  # the losses of the steps differ by far more than the tolerance: it discriminates
    assert max(curve) - min(curve) > 100 * LOSS_TOL, curve
    # rank 1 writes neither metrics nor TensorBoard nor the run's config: only rank 0 does
    assert not any("rank1" in p.name for p in job.iterdir() if not p.name.startswith("trace"))


@pytest.mark.parametrize("engine, extra, tol", [
    ("fsdp", ["train.activation_checkpointing=true", "train.compile=true"], 1e-4),  # compiled: eager within 1e-4
    ("zero3", ["train.activation_checkpointing=true"], LOSS_TOL),
])
def test_activation_checkpointing_and_compile_work_under_the_engines(runs, token_dataset, tmp_path, engine, extra, tol):
    config = _new_config(tmp_path / engine, token_dataset)
    _run(2, config, ENGINES[engine] + extra, tmp_path)
    _assert_close_curves(_losses(_run_dir(config)), _losses(runs.get("single", 1)), tol)


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero0", "zero2", "zero3"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank_and_leaves_the_weights(token_dataset, tmp_path, engine):
    config = _new_config(tmp_path / engine, token_dataset)
    overrides = ENGINES.get(engine, ["engine=deepspeed", "deepspeed.zero_stage=0"]) + ["train.steps=3"]
    # micro-step 5 (the last of step 3) is NaN on rank 1 only: both ranks must skip step 3
    _run(2, config, overrides, tmp_path, TRACE_NAN_RANK="1", TRACE_NAN_CALLS="5")
    run_dir = _run_dir(config)
    records = _train_records(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1] and records[2]["loss"] is None
    before, after = (open_checkpoint(run_dir / "checkpoints" / checkpoint_name(s)).load_model() for s in (2, 3))
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(b[k], a[k]) for k in b), "the skipped step changed weights"


# ---------------------------------------------------------------- 2. each rank its own rows
@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_each_rank_reads_only_its_rows_and_together_every_row_once_per_step(runs, token_dataset, engine):
    job = runs.get(engine)
    layout = LaneLayout(Manifest.load(str(token_dataset)).split("train").windows, ROWS, 0)
    per_rank = [_trace(job, r) for r in range(2)]
    for rank, batches in enumerate(per_rank):
        assert [b["step"] for b in batches] == list(range(STEPS * 2)), "every micro-step once, in order"
        mine = list(layout.rank_rows(rank, 2))
        for b in batches:
            assert b["rows"] == mine
            windows, reset = layout.windows(b["step"], layout.rank_rows(rank, 2))
            assert b["windows"] == windows.tolist() and b["reset"] == reset.tolist()
    for step in range(STEPS * 2):
        rows = per_rank[0][step]["rows"] + per_rank[1][step]["rows"]
        assert sorted(rows) == list(range(ROWS)) and len(set(rows)) == ROWS
    # validation rows are split the same way
    val = [_trace(job, r, "val") for r in range(2)]
    assert {tuple(b["rows"]) for b in val[0]} == {(0,)} and {tuple(b["rows"]) for b in val[1]} == {(1,)}


# ---------------------------------------------------------------- 3. SIGKILL, then resume
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2"])
def test_sigkill_at_a_random_step_then_resume_on_two_processes_equals_the_uninterrupted_run(
        runs, token_dataset, tmp_path, engine):
    reference = runs.get(engine)
    config = _new_config(tmp_path / "killed", token_dataset)
    run_dir = _run_dir(config)
    kill_at = random.Random(f"kill-{engine}").randint(3, STEPS - 2)
    proc = _start(2, config, ENGINES[engine], tmp_path)
    try:
        _wait_for_step(proc, run_dir, kill_at)
    finally:
        _killpg(proc)
        proc.communicate()
    out = _run(2, config, ENGINES[engine], tmp_path)
    assert "resumed from" in out
    got, want = _train_records(run_dir), _train_records(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for field in DETERMINISTIC:
        assert [r[field] for r in got] == [r[field] for r in want], field
    assert [r["val_loss"] for r in _val_records(run_dir)] == [r["val_loss"] for r in _val_records(reference)]
    last = checkpoint_name(STEPS)
    for name in ("lanes.safetensors", "rng.safetensors"):
        a, b = load_file(run_dir / "checkpoints" / last / name), load_file(reference / "checkpoints" / last / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---------------------------------------------------------------- 4. elastic
def _assert_lanes_close(got: Path, want: Path) -> None:
    a, b = load_file(got / "lanes.safetensors"), load_file(want / "lanes.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape[0] == ROWS, k  # stored by global row whatever the world size
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_a_two_process_checkpoint_resumes_on_one_process(runs, token_dataset, tmp_path, engine):
    job = runs.get(engine)
    config = _resume_copy(job, 4, tmp_path / "one", token_dataset)
    out = _run(1, config, ENGINES[engine], tmp_path)
    assert "step 4, micro-step 8" in out and "1 rank(s)" in out
    run_dir = _run_dir(config)
    # the one rank reads all rows, from the checkpoint's micro-step on
    batches = _trace(run_dir, 0)
    assert [b["step"] for b in batches] == list(range(8, STEPS * 2)) and all(b["rows"] == [0, 1, 2, 3] for b in batches)
    _assert_close_curves(_losses(run_dir), _losses(job, first=5))
    _assert_lanes_close(run_dir / "checkpoints" / checkpoint_name(STEPS), job / "checkpoints" / checkpoint_name(STEPS))


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_a_one_process_checkpoint_resumes_on_two_processes(runs, token_dataset, tmp_path, engine):
    one = runs.get(engine, nproc=1)
    _assert_close_curves(_losses(one), _losses(runs.get("single", 1)))
    config = _resume_copy(one, 4, tmp_path / "two", token_dataset)
    out = _run(2, config, ENGINES[engine], tmp_path)
    assert "step 4, micro-step 8" in out and "2 rank(s)" in out
    run_dir = _run_dir(config)
    for rank in range(2):
        batches = _trace(run_dir, rank)
        assert [b["step"] for b in batches] == list(range(8, STEPS * 2))
        assert all(b["rows"] == [2 * rank, 2 * rank + 1] for b in batches)
    _assert_close_curves(_losses(run_dir), _losses(one, first=5))
    _assert_lanes_close(run_dir / "checkpoints" / checkpoint_name(STEPS), one / "checkpoints" / checkpoint_name(STEPS))


# ---------------------------------------------------------------- 5. SIGTERM to the launcher
def test_sigterm_to_the_launcher_brings_every_rank_to_one_checkpoint_and_exit_75(runs, token_dataset, tmp_path):
    reference = runs.get("ddp")
    config = _new_config(tmp_path / "term", token_dataset)
    run_dir = _run_dir(config)
    env = {**_env(tmp_path), "NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port()), "PYTHON": sys.executable,
           "ENTRY": "tests.pretrain.dist_trace"}
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(config), "--set", "engine=ddp"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _wait_for_step(proc, run_dir, 3)
        proc.send_signal(signal.SIGTERM)  # the launcher script only
        out, err = _finish(proc)
    finally:
        _killpg(proc)
    assert proc.returncode == REQUEUE_EXIT_CODE, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    # both ranks print to the same pipe: their lines may run into each other
    said = re.findall(r"signal SIGTERM: checkpoint (\S+) written; rank (\d) exiting with 75", out)
    assert sorted(rank for _, rank in said) == ["0", "1"], out
    paths = {path for path, _ in said}
    assert len(paths) == 1, said
    path = Path(paths.pop())
    stopped = _train_records(run_dir)[-1]["step"]
    assert path.name == checkpoint_name(stopped) and 3 <= stopped < STEPS
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == path.name
    assert json.loads((path / "trainer.json").read_text())["step"] == stopped
    # and the requeued job continues exactly
    _run(2, config, ENGINES["ddp"], tmp_path)
    assert [r["loss"] for r in _train_records(run_dir)] == [r["loss"] for r in _train_records(reference)]


# ---------------------------------------------------------------- 6. two nodes on loopback
def test_two_torchrun_nodes_on_loopback_give_the_losses_of_one_node_with_two_processes(runs, token_dataset, tmp_path):
    reference = runs.get("ddp")
    config = _new_config(tmp_path / "nodes", token_dataset)
    port = _free_port()
    procs = []
    for node in range(2):
        env = {**_env(tmp_path), "NNODES": "2", "NPROC_PER_NODE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": f"test-{port}",
               "PYTHON": sys.executable, "ENTRY": "tests.pretrain.dist_trace"}
        cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(config), "--set", "engine=ddp"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True))
    try:
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            _killpg(p)
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    run_dir = _run_dir(config)
    assert [r["loss"] for r in _train_records(run_dir)] == [r["loss"] for r in _train_records(reference)]
    assert {tuple(_trace(run_dir, r)[0]["rows"]) for r in range(2)} == {(0, 1), (2, 3)}


# ---------------------------------------------------------------- 7. export
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero1", "zero3"])
def test_export_gives_a_single_process_model_with_the_same_logits(runs, tmp_path, engine):
    job, single = runs.get(engine), runs.get("single", 1)
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "pretrain.export", str(job), str(out)], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "export.json"}
    meta = json.loads((out / "export.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2
    exported = open_checkpoint(out).load_model()
    trained = open_checkpoint(single).load_model()  # the same training in one process: what the weights must be
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = exported(ids, exported.init_state(2), ids == 1).logits
        want = trained(ids, trained.init_state(2), ids == 1).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    full = {k: v for k, v in exported.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in full.values())
    if engine == "ddp":  # a full checkpoint exports bit for bit
        saved = load_file(job / "checkpoints" / checkpoint_name(STEPS) / "model.safetensors")
        assert all(torch.equal(full[k], saved[k]) for k in saved)


def test_a_new_run_starts_from_another_engines_weights(runs, token_dataset, tmp_path):
    from pretrain.train import Trainer
    from zarvan_dist.training.config import load_run_config

    source = runs.get("zero3") / "checkpoints" / checkpoint_name(STEPS)
    config = _new_config(tmp_path / "init", token_dataset)
    trainer = Trainer(load_run_config(config, [f"checkpoint.init_from={source}"]))
    want = open_checkpoint(source).load_model().state_dict()
    got = trainer.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert trainer.counters.step == 0 and trainer.resume() is None  # weights only: the run itself starts afresh
