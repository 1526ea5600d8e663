"""verify names the first shard that disagrees with the manifest; inspect decodes a window."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from data_prep.__main__ import main
from data_prep.corpus import CorpusConfig
from data_prep.shards import ShardsConfig, write_shards
from data_prep.verify import verify_dataset
from prep_helpers import SEQ_LEN, WINDOWS_PER_SHARD
from zarvan_dist.data import DatasetError, WindowReader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_path, corpus_dir):
    out = tmp_path_factory.mktemp("verify") / "ds"
    write_shards(ShardsConfig(tokenizer=tokenizer_path, out=str(out), seq_len=SEQ_LEN, val_fraction=0.1,
                              windows_per_shard=WINDOWS_PER_SHARD, corpus=CorpusConfig(inputs=[str(corpus_dir)])),
                 progress=False)
    return out


@pytest.fixture
def copy(dataset, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out


def test_clean_dataset_verifies(dataset, capsys):
    assert main(["verify", str(dataset), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_a_dataset_of_several_tasks_verifies(make_shards, tmp_path):
    """A window after a task boundary starts a new stream: verify checks continuity within each task only."""
    make_shards(tmp_path / "ds", num_tasks=3)
    assert verify_dataset(str(tmp_path / "ds"), progress=False)["shards"] > 3


def test_a_flipped_token_that_the_hashes_agree_with_is_caught_by_its_crc(copy):
    """Damage done before the files were hashed (a bad write, a bit flip in memory): only the CRC-32 of the
    window tells. The shard's size and sha256 in the manifest are made to agree with the damage."""
    rel = "tasks/00000/train/shard-000002.tar"
    shard = copy / rel
    data = bytearray(shard.read_bytes())
    stride = json.loads((copy / "manifest.json").read_text())["sample_bytes"]
    data[3 * stride + 512 + 128 + 4] ^= 0x01  # a token of the shard's 4th window
    shard.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(s for s in manifest["splits"]["train"]["shards"] if s["path"] == rel)
    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=rf"{re.escape(rel)} sample 3: the tokens do not match their CRC-32"):
        verify_dataset(str(copy), progress=False)
    with pytest.raises(DatasetError, match="do not match their CRC-32"):  # and a reader streaming it
        list(WindowReader(str(copy)).iter_windows("train", 2 * WINDOWS_PER_SHARD))


def test_flipped_byte_is_named(copy, capsys):
    shard = copy / "tasks" / "00000" / "train" / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"train/shard-000003\.tar: sha256"):
        verify_dataset(str(copy), progress=False)
    assert main(["verify", str(copy), "--quiet"]) == 1
    assert "train/shard-000003.tar" in capsys.readouterr().err


def test_truncated_shard_is_named(copy, capsys):
    shard = copy / "tasks" / "00000" / "val" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DatasetError, match=r"val/shard-000001\.tar: 5000 bytes, manifest says \d+"):
        verify_dataset(str(copy), progress=False)
    assert main(["verify", str(copy), "--quiet"]) == 1
    assert "val/shard-000001.tar" in capsys.readouterr().err


def test_missing_shard_is_named(copy):
    (copy / "tasks" / "00000" / "train" / "shard-000000.tar").unlink()
    with pytest.raises(DatasetError, match=r"train/shard-000000\.tar: listed in the manifest but missing"):
        verify_dataset(str(copy), progress=False)


def test_inspect_prints_totals_and_decodes_a_window(dataset, capsys):
    assert main(["inspect", str(dataset), "--window", "0", "--ids"]) == 0
    out = capsys.readouterr().out
    assert "seq_len     32" in out and "train" in out and "val" in out
    assert "window 0 of train: tasks/00000/train/shard-000000.tar sample 0, 33 tokens" in out
    lines = out.splitlines()
    ids = next(i for i, line in enumerate(lines) if line.startswith("ids "))
    assert lines[ids].startswith("ids [1, "), "the first window starts with BOS"
    assert lines[ids + 1].startswith("<s>")
    assert main(["inspect", str(dataset), "--split", "val", "--window", "999999"]) == 1


@pytest.mark.parametrize("job, words", [
    ("tokenizer", "--vocab-size"), ("shards", "--seq-len"), ("verify", "first mismatch"), ("inspect", "--window"),
])
def test_every_job_explains_itself(job, words, capsys):
    with pytest.raises(SystemExit) as exit:
        main([job, "--help"])
    assert exit.value.code == 0
    assert words in " ".join(capsys.readouterr().out.split())
