"""A shards job killed with SIGKILL mid-run, then run again, ends byte-identical to one never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_prep.storage import PROGRESS_NAME
from prep_helpers import SEQ_LEN, WINDOWS_PER_SHARD, read_tree
from slow_job import recorded, slow_command

REPO = Path(__file__).resolve().parents[2]


def _args(corpus: Path, tokenizer: str, out: Path) -> list[str]:
    # Exactly the command line of the issue, plus the small shards that make many of them.
    return ["shards", "--input", str(corpus), "--tokenizer", tokenizer,
            "--out", str(out), "--seq-len", str(SEQ_LEN), "--workers", "2", "--seed", "0",
            "--val-fraction", "0.1", "--windows-per-shard", str(WINDOWS_PER_SHARD), "--quiet"]


def _recorded_shards(out: Path) -> int:
    try:
        return recorded(json.loads((out / PROGRESS_NAME).read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_sigkill_then_rerun_is_byte_identical(make_shards, corpus_dir, tokenizer_path, tmp_path):
    ref = tmp_path / "ref"
    make_shards(ref)
    total = sum(len(s["shards"]) for s in json.loads((ref / "manifest.json").read_text())["splits"].values())

    out = tmp_path / "killed"
    # The job sleeps after every journaled shard so the kill lands mid-run.
    proc = subprocess.Popen(slow_command(0.05, _args(corpus_dir, tokenizer_path, out)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while _recorded_shards(out) < 10:
        assert proc.poll() is None, f"job ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.01)
    # the whole process group, tokenizer workers included, as when a node dies
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert _recorded_shards(out) < total
    # No file under a final shard name is partial: each equals the uninterrupted run's.
    finals = sorted(out.rglob("shard-*.tar"))
    assert finals
    for path in finals:
        assert path.read_bytes() == (ref / path.relative_to(out)).read_bytes(), path

    rerun = subprocess.run([sys.executable, "-m", "data_prep", *_args(corpus_dir, tokenizer_path, out)], cwd=REPO,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    # the summary's train row: split, documents, tokens, windows, shards, kept, tail
    train = next(line.split() for line in rerun.stdout.splitlines() if line.startswith("train"))
    assert 1 <= int(train[5]) < int(train[4]), "the re-run kept the complete shards and redid the rest"
    assert read_tree(str(out)) == read_tree(str(ref))
