"""Data faults end the job fast and name the culprit: a damaged shard in the middle of a lane (a flipped
token byte, an id past the vocabulary under a matching CRC, a damaged tar header, a cut, a shard gone)
ends the lane loader's iteration with one DatasetError naming that shard and window, with 0, 1 or 2
workers, and the workers stopped; a shard whose size is not the manifest's is refused at the start;
a script that leaves a loader open still exits; and the trainer on a damaged shard exits with status
1 and one `error:` line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from itertools import islice
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.pretrain.run_helpers import ROOT, run_config, trainer_env
from tests.pretrain.token_data import random_documents, write_token_dataset
from zarvan_dist.data import DatasetError, LaneLayout, Manifest
from zarvan_dist.data.loader import _STOP_GRACE_S, LaneLoader
from zarvan_dist.data.shards import npy_header, payload_bytes, window_crc
from zarvan_dist.training.checkpoint import verify

SEQ_LEN, VOCAB, WINDOWS_PER_SHARD, ROWS = 16, 64, 10, 4
DAMAGED = 34
"""The damaged window: row 1's lane is windows 20..39, so row 1 streams from shard 2 into shard 3 and
meets the damage in the middle of shard 3 (micro-step 14); windows 30..39 are shard 3's."""
SHARD = "train/shard-000003.tar"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """80 train windows in 8 shards of 10 (lanes of 20 for 4 rows), a few val windows."""
    root = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    train = random_documents(rng, 200, VOCAB, 20, 60)[:80 * SEQ_LEN + 1]
    write_token_dataset(root, {"train": train, "val": random_documents(rng, 6, VOCAB, 20, 60)}, SEQ_LEN, VOCAB,
                        WINDOWS_PER_SHARD)
    assert Manifest.load(str(root)).split("train").windows == 80
    return root


def _layout(root: Path) -> LaneLayout:
    return LaneLayout(Manifest.load(str(root)).split("train").windows, ROWS)


def _offsets(manifest: Manifest, sample: int) -> tuple[int, int]:
    """Byte offsets in its shard of sample ``sample``'s first token and of its CRC text."""
    stride, block = manifest.sample_bytes, tarfile.BLOCKSIZE
    tokens = sample * stride + block + len(npy_header(manifest.seq_len, manifest.dtype))
    crc = sample * stride + block + -(-payload_bytes(manifest.seq_len, manifest.dtype) // block) * block + block
    return tokens, crc


def damage(root: Path, kind: str) -> Path:
    """Damage window ``DAMAGED`` of ``root``'s shard ``SHARD`` as ``kind`` says; returns the shard."""
    shard = root / SHARD
    manifest = Manifest.load(str(root))
    sample = DAMAGED - 30
    data = bytearray(shard.read_bytes())
    tokens_at, crc_at = _offsets(manifest, sample)
    if kind == "crc":  # the low bit of a token: the id stays below the vocabulary, only the CRC-32 sees it
        data[tokens_at + 2 * 5] ^= 1
    elif kind == "vocab":  # an id past the vocabulary, and a CRC member rewritten to match it
        window = np.frombuffer(bytes(data[tokens_at:tokens_at + 2 * (SEQ_LEN + 1)]), "<u2").copy()
        window[5] = VOCAB + 136
        data[tokens_at:tokens_at + window.nbytes] = window.tobytes()
        data[crc_at:crc_at + 8] = b"%08x" % window_crc(window)
    elif kind == "header":  # a byte of the sample's tar header: the tar ends there, quietly
        data[sample * manifest.sample_bytes + 3] ^= 0x20
    elif kind == "cut":  # the shard cut before the window, and the manifest made to agree
        del data[sample * manifest.sample_bytes:]
        next(s for s in manifest.split("train").shards if s.path == SHARD).bytes = len(data)
        (root / "manifest.json").write_text(manifest.to_json())
    shard.write_bytes(bytes(data))
    return shard


def _copy(clean: Path, tmp_path: Path) -> Path:
    root = tmp_path / "tokens"
    shutil.copytree(clean, root)
    return root


def _no_workers_left() -> None:
    deadline = time.monotonic() + 5
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in psutil.Process().children()):
        assert time.monotonic() < deadline, f"workers left running: {psutil.Process().children()}"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("kind, window, says", [
    pytest.param("crc", DAMAGED, "the tokens do not match their CRC-32", id="crc"),
    pytest.param("vocab", DAMAGED, f"token id {VOCAB + 136} at position 5 is not below the vocabulary size {VOCAB}",
                 id="vocab"),
    pytest.param("header", DAMAGED, "the shard ends after 4 of its 10 windows from window 30", id="header"),
    pytest.param("cut", DAMAGED, "the shard ends after 4 of its 10 windows from window 30", id="cut"),
    pytest.param("missing", 30, "shard listed in the manifest is missing", id="missing"),  # gone after the start
])
def test_a_damaged_shard_ends_the_iteration_with_one_error_naming_it(clean, tmp_path, workers, kind, window, says):
    root = _copy(clean, tmp_path)
    shard = damage(root, kind) if kind != "missing" else root / SHARD
    loader = LaneLoader(str(root), "train", _layout(root), workers=workers)
    if kind == "missing":
        shard.unlink()
    started = time.monotonic()
    batches = iter(loader)
    with pytest.raises(DatasetError) as caught:
        for batch in batches:
            assert batch.step < 20, "the damage was read past"
    message = str(caught.value)
    assert time.monotonic() - started < 10
    assert message.startswith(f"{root}/{SHARD}"), message
    assert says in message
    assert message.endswith(f"(split train, window {window}, row 1)")
    assert "\n" not in message and "Caught" not in message and "worker process" not in message
    assert not re.search(r"shard-00000[0-24-9]\.tar", message), "another shard is named"
    _no_workers_left()


def test_the_error_names_the_rank_in_a_job(clean, tmp_path):
    root = _copy(clean, tmp_path)
    damage(root, "crc")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(DatasetError, match=rf"\(split train, window {DAMAGED}, row 1, rank 0\)$"):
            list(LaneLoader(str(root), "train", _layout(root), workers=1))
    finally:
        torch.distributed.destroy_process_group()
    _no_workers_left()


def test_close_kills_a_worker_that_does_not_leave(clean):
    loader = LaneLoader(str(clean), "train", _layout(clean), workers=2)
    batches = iter(loader)
    next(batches)
    workers = psutil.Process().children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGSTOP)  # it can neither read the request to leave nor leave
    started = time.monotonic()
    loader.close()
    assert time.monotonic() - started < _STOP_GRACE_S + 2
    _no_workers_left()
    time.sleep(0.2)  # the SIGCHLD of the killed worker is in: torch must not take it for a failure
    with pytest.raises(StopIteration):
        next(batches)  # closed with its loader


def test_the_lanes_before_the_damage_are_read_intact(clean, tmp_path):
    root = _copy(clean, tmp_path)
    with LaneLoader(str(clean), "train", _layout(clean), workers=2) as loader:
        want = [b.tokens for b in islice(loader, DAMAGED - 20)]
    damage(root, "crc")
    with LaneLoader(str(root), "train", _layout(root), workers=2) as loader:
        got = [b.tokens for b in islice(loader, DAMAGED - 20)]
    assert all((a == b).all() for a, b in zip(want, got))
    _no_workers_left()


@pytest.mark.parametrize("kind", ["cut", "grown", "missing"])
def test_the_start_refuses_a_shard_whose_size_is_not_the_manifests(clean, tmp_path, kind):
    root = _copy(clean, tmp_path)
    shard = root / SHARD
    size = shard.stat().st_size
    if kind == "cut":
        shard.write_bytes(shard.read_bytes()[:size - 3000])
        says = f"{size - 3000} bytes, the manifest says {size}"
    elif kind == "grown":
        shard.write_bytes(shard.read_bytes() + bytes(512))
        says = f"{size + 512} bytes, the manifest says {size}"
    else:
        shard.unlink()
        says = "shard listed in the manifest is missing"
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(shard))}: {says}"):
        LaneLoader(str(root), "train", _layout(root), workers=2)
    _no_workers_left()


SCRIPT = """
import os, sys
from itertools import islice
import psutil
from zarvan_dist.data import LaneLayout, Manifest
from zarvan_dist.data.loader import _STOP_GRACE_S, LaneLoader
url, usage = sys.argv[1], sys.argv[2]
layout = LaneLayout(Manifest.load(url).split("train").windows, 4)

def workers():
    return " ".join(str(c.pid) for c in psutil.Process().children())

if usage == "open":  # an iterator left open in a global
    batches = iter(LaneLoader(url, "train", layout, workers=2))
    steps = [next(batches).step for _ in range(3)]
elif usage == "with":
    with LaneLoader(url, "train", layout, workers=2) as loader:
        batches = iter(loader)
        steps = [next(batches).step for _ in range(3)]
        print(workers(), flush=True)
elif usage == "dropped":  # a for loop left early: its iterator dropped
    for batch in LaneLoader(url, "train", layout, workers=2):
        if batch.step == 2:
            print(workers(), flush=True)
            break
elif usage == "raises":  # the script ends with an error while the loader is open
    batches = iter(LaneLoader(url, "train", layout, workers=2))
    next(batches)
    print(workers(), flush=True)
    raise SystemExit("stopped")
print(workers(), flush=True)
"""


@pytest.mark.parametrize("usage", ["open", "with", "dropped", "raises"])
def test_a_script_that_leaves_a_loader_open_exits(clean, tmp_path, usage):
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(clean), usage], cwd=ROOT,
                         env=trainer_env(tmp_path), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert run.returncode == (1 if usage == "raises" else 0), run.stderr
    assert elapsed < 10, f"the script took {elapsed:.1f} s to exit"
    pids = [int(p) for line in run.stdout.split("\n")[:1] for p in line.split()]
    if usage in ("open", "raises"):
        assert len(pids) == 2, run.stdout  # both workers were running when the script ended
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


@pytest.mark.parametrize("workers, kind", [(0, "crc"), (1, "vocab"), (2, "crc"), (2, "size")])
def test_the_trainer_on_a_damaged_shard_exits_with_one_error_line(clean, tmp_path, workers, kind):
    root = _copy(clean, tmp_path)
    if kind == "size":  # cut, the manifest unchanged: refused before the first step
        shard = root / SHARD
        shard.write_bytes(shard.read_bytes()[:-3000])
    else:
        shard = damage(root, kind)
    config = run_config(tmp_path, root, data={"rows": ROWS, "workers": workers},
                        train={"steps": 12, "grad_accum": 2}, checkpoint={"every": 2}, eval={"every": 0},
                        logging={"every": 1, "tensorboard": False, "progress": False})
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config)], cwd=ROOT,
                         env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert run.returncode == 1, run.stderr
    assert elapsed < 30, f"the trainer took {elapsed:.1f} s to exit"
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    assert re.match(rf"error: {re.escape(str(shard))}[: ]", errors[0]), run.stderr
    assert ("the manifest says" if kind == "size" else f"(split train, window {DAMAGED}, row 1)") in errors[0]
    assert "Traceback" not in run.stderr and "Caught" not in run.stderr, run.stderr
    # nothing lost: the damage is met at micro-step 14 (step 8); the checkpoints of steps 2, 4, 6 (each
    # verifying) and the records of steps 1-7 stand
    checkpoints = tmp_path / "run" / "checkpoints"
    if kind == "size":
        assert not checkpoints.exists() or not list(checkpoints.glob("step-*"))
        return
    assert (checkpoints / "latest").read_text().strip() == "step-00000006"
    for step in (2, 4, 6):
        verify(checkpoints / f"step-{step:08d}")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 8))


@pytest.mark.parametrize("engine, workers", [("ddp", 0), ("ddp", 1), ("fsdp", 2), ("deepspeed", 1)])
def test_a_distributed_job_on_a_damaged_shard_ends_on_every_rank(clean, tmp_path, engine, workers):
    """Two processes under torchrun (gloo), for each engine: the rank whose rows meet the damage stops with
    one error line naming the shard and its rank; the other leaves its collective (the peer is gone) and
    the job ends in seconds with a failure status, not at the collective timeout."""
    root = _copy(clean, tmp_path)
    shard = damage(root, "crc")
    config = run_config(tmp_path, root, engine=engine, data={"rows": ROWS, "workers": workers},
                        train={"steps": 12, "grad_accum": 2}, checkpoint={"every": 0}, eval={"every": 0})
    env = {**trainer_env(tmp_path), "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "pretrain", "--config", str(config)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, failed = [], None  # the time from the fault (its error line) to the end of the job: start-up
    try:                      # (DeepSpeed may compile an op on first use) is not the fault's
        for line in job.stderr:
            lines.append(line)
            if failed is None and line.startswith("error:"):
                failed = time.monotonic()
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    stderr = "".join(lines)
    assert job.returncode != 0 and failed is not None, stderr
    assert time.monotonic() - failed < 30, f"the job took {time.monotonic() - failed:.1f} s to end after the fault"
    errors = [line for line in lines if line.startswith("error:") and str(shard) in line]
    assert len(errors) == 1 and f"window {DAMAGED}, row 1" in errors[0] and "rank 0" in errors[0], stderr
