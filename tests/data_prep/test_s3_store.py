"""Object stores for real: inputs -> tokenizer -> shards -> verify -> a short training run, all on S3.

A moto S3 server runs on 127.0.0.1 in a subprocess; every job runs as its real command line in a
subprocess that reaches the server only through s3fs, with dummy credentials and the endpoint URL
from the environment (``FSSPEC_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``). The corpus is uploaded
to ``s3://BUCKET/corpus``; the tokenizer, the dataset and its manifest are written to the bucket and
read back from it; the trainer streams its windows from the bucket, in the training process and in
a DataLoader worker process. Nothing but loopback traffic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("s3fs", reason="s3fs is needed for the S3 test (pip install -e '.[dev]' or '.[s3]')")
pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 test (pip install -e '.[dev]')")

import fsspec  # noqa: E402
import s3fs  # noqa: E402

from prep_helpers import corpus_files  # noqa: E402
from s3_server import MotoServer, s3_env  # noqa: E402
from zarvan_dist.training.checkpoint import LATEST, checkpoint_name, verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "zarvan-test"
CORPUS = f"s3://{BUCKET}/corpus"
TOKENIZER = f"s3://{BUCKET}/tok/tokenizer.model"
DATA = f"s3://{BUCKET}/data"
VOCAB = 400  # the test corpus has ~320 distinct characters (emoji, CJK): 300 is too few
SEQ_LEN = 32
WINDOWS_PER_SHARD = 64  # several shards per split: several objects, read in order
STEPS = 2
TIMEOUT = 180


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The moto server, up for the module, with this process's environment and fsspec config pointing at it.

    Yields ``(server, fs)``: ``server.log`` holds its request log; ``fs`` is an ``S3FileSystem`` of
    its own (not from fsspec's instance cache) for setting up and reading back the bucket in the test.
    """
    home = tmp_path_factory.mktemp("s3")
    server = MotoServer(home / "moto.log")
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in s3_env(server.endpoint, home).items():
                mp.setenv(key, value)
            # fsspec reads FSSPEC_* variables once, at import: set its config here as a child's import does.
            mp.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}),
                                                  "endpoint_url": server.endpoint})
            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield server, fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def _env(tmp: Path) -> dict[str, str]:
    """A job's environment: the S3 settings (in os.environ while ``s3`` is up), one thread, a private TMPDIR."""
    tmpdir = tmp / "tmp"
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository; it must exit 0."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(tmp), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dataset(s3, tmp_path_factory):
    """The corpus uploaded to the bucket, a tokenizer trained on it and the shards written from it,
    both jobs reading and writing only s3:// URLs. Returns the manifest, read back through s3fs."""
    _, fs = s3
    tmp = tmp_path_factory.mktemp("prep")
    fs.pipe({f"{CORPUS}/{name}": data for name, data in corpus_files().items()})
    _run(["-m", "data_prep", "tokenizer", "--input", CORPUS, "--vocab-size", str(VOCAB), "--out", TOKENIZER,
          "--threads", "1", "--quiet"], tmp)
    _run(["-m", "data_prep", "shards", "--tokenizer", TOKENIZER, "--input", CORPUS, "--out", DATA,
          "--seq-len", str(SEQ_LEN), "--val-fraction", "0.2", "--windows-per-shard", str(WINDOWS_PER_SHARD),
          "--quiet"], tmp)
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{DATA}/manifest.json"))


def test_server_is_reached_from_this_process_and_a_child(s3, tmp_path):
    """The S3 plumbing alone: an object put here is read by a fresh interpreter configured only by its environment."""
    server, fs = s3
    fs.pipe_file(f"s3://{BUCKET}/probe/hello.txt", b"hello from the test")
    code = ("import fsspec; fs, path = fsspec.core.url_to_fs('s3://%s/probe/hello.txt'); "
            "print(fs.endpoint_url); print(fs.cat_file(path).decode())" % BUCKET)
    out = _run(["-c", code], tmp_path).stdout.splitlines()
    assert out == [server.endpoint, "hello from the test"]
    fs.rm(f"s3://{BUCKET}/probe", recursive=True)


def test_tokenizer_and_shards_write_to_the_bucket(s3, dataset):
    _, fs = s3
    assert fs.size(TOKENIZER) > 0
    assert dataset["vocab_size"] == VOCAB and dataset["seq_len"] == SEQ_LEN
    assert dataset["corpus"]["documents"] > 0, dataset["corpus"]
    keys = {p[len(f"{BUCKET}/data/"):] for p in fs.find(DATA)}
    assert "manifest.json" in keys and dataset["tokenizer"]["path"] in keys
    assert not any(".tmp" in k for k in keys), f"temporary objects left in the bucket: {sorted(keys)}"
    for name in ("train", "val"):
        split = dataset["splits"][name]
        assert split["windows"] > 0 and len(split["shards"]) >= 1, (name, split)
        assert split["documents_path"] in keys
        for shard in split["shards"]:
            assert shard["path"] in keys
            assert fs.size(f"{DATA}/{shard['path']}") == shard["bytes"], shard["path"]
    assert len(dataset["splits"]["train"]["shards"]) > 1, "expected several train shards (several objects)"


def test_verify_reads_the_bucket(dataset, tmp_path):
    out = _run(["-m", "data_prep", "verify", DATA, "--quiet"], tmp_path).stdout
    ok = [line for line in out.splitlines() if line.startswith("ok: ")]
    shards = sum(len(dataset["splits"][n]["shards"]) for n in ("train", "val"))
    assert ok and ok[0].startswith(f"ok: {shards} shards, ") and ok[0].endswith("match the manifest"), out


def _run_config(tmp_path: Path, workers: int) -> Path:
    """A tiny zarvan run on the S3 dataset; a local run_dir. (The config needs a vocab_size; the
    trainer replaces it with the manifest's.)"""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"arch": "zarvan", "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "chunk_size": 8},
        "data": {"dir": DATA, "rows": 2, "workers": workers, "prefetch": 2},
        "train": {"steps": STEPS, "grad_accum": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every": STEPS, "keep": 1},
        "eval": {"every": STEPS, "rows": 2, "steps": 1},
        "logging": {"every": 1, "peak_tflops": 0.1, "progress": False, "tensorboard": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "dataloader-worker"])
def test_training_reads_the_bucket(s3, dataset, tmp_path, workers):
    """``python -m pretrain`` streams train and val windows from s3:// (workers 1: in a DataLoader worker)."""
    server, _ = s3
    config = _run_config(tmp_path, workers)
    logged = len(server.log_text())
    _run(["-m", "pretrain", "--config", str(config), "--set", f"data.workers={workers}"], tmp_path)
    requests = server.log_text()[logged:]
    for split in ("train", "val"):
        shards = [f"GET /{BUCKET}/data/{s['path']} " for s in dataset["splits"][split]["shards"]]
        assert any(get in requests for get in shards), f"no {split} shard read from the server:\n{requests}"
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == checkpoint_name(STEPS)
    verify(ckpts / checkpoint_name(STEPS))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), records
    assert any("loss" not in r for r in records), f"no evaluation record (val split read from S3): {records}"
