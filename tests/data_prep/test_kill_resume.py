"""A shards job killed with SIGKILL mid-run, then run again, ends byte-identical to one never stopped: the
finished tasks are kept, the killed one is written again from its start, and no worker outlives the kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prep_helpers import SEQ_LEN, WINDOWS_PER_SHARD, read_tree
from slow_job import slow_command

REPO = Path(__file__).resolve().parents[2]
TASKS = 3


def _args(corpus: Path, tokenizer: str, out: Path) -> list[str]:
    # Exactly the command line of the issue, plus the small shards that make many of them.
    return ["shards", "--input", str(corpus), "--tokenizer", tokenizer,
            "--out", str(out), "--seq-len", str(SEQ_LEN), "--workers", "2", "--seed", "0", "--num-tasks", str(TASKS),
            "--val-fraction", "0.1", "--windows-per-shard", str(WINDOWS_PER_SHARD), "--quiet"]


def test_sigkill_then_rerun_is_byte_identical(make_shards, corpus_dir, tokenizer_path, tmp_path):
    ref = tmp_path / "ref"
    make_shards(ref, num_tasks=TASKS)

    out = tmp_path / "killed"
    # The job sleeps after every shard it puts in place, so the kill lands inside task 1.
    proc = subprocess.Popen(slow_command(0.05, _args(corpus_dir, tokenizer_path, out)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    task1 = out / "tasks" / "00001"
    while not (task1 / "train").is_dir() or len(list((task1 / "train").glob("shard-*.tar"))) < 2:
        assert proc.poll() is None, f"job ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.01)
    # the whole process group, tokenizer workers included, as when a node dies
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert (out / "tasks" / "00000" / "task.json").is_file() and not (task1 / "task.json").exists()
    # No file under a final shard name is partial: each equals the uninterrupted run's.
    finals = sorted(out.rglob("shard-*.tar"))
    assert finals
    for path in finals:
        assert path.read_bytes() == (ref / path.relative_to(out)).read_bytes(), path

    rerun = subprocess.run([sys.executable, "-m", "data_prep", *_args(corpus_dir, tokenizer_path, out)], cwd=REPO,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"tasks: 2 written, 1 kept from an earlier run (of {TASKS})" in rerun.stdout
    assert read_tree(str(out)) == read_tree(str(ref))


def test_the_workers_die_with_a_killed_job(corpus_dir, tokenizer_path, tmp_path):
    """SIGKILL to the job's process alone (not its group, as a node's OOM killer picks one process): its
    tokenizer workers end too, instead of running on (they ask the kernel for SIGKILL when the job dies)."""
    psutil = __import__("pytest").importorskip("psutil")
    out = tmp_path / "orphans"
    proc = subprocess.Popen(slow_command(0.2, _args(corpus_dir, tokenizer_path, out)), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    job = psutil.Process(proc.pid)
    while len(job.children()) < 2 or not list(out.rglob("shard-*.tar")):  # both workers up, encoding
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended or made no progress"
        time.sleep(0.05)
    workers = job.children()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived the job: {[p.pid for p in alive]}"
