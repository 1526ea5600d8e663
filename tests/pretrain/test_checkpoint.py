"""Checkpointer: atomic saves, keep K, partial and corrupt checkpoints, path resolution, no unpickling."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from run_helpers import run_config
from pretrain.train import Trainer
from zarvan_dist.training.checkpoint import (
    LATEST,
    META,
    TMP_PREFIX,
    CheckpointError,
    Checkpointer,
    checkpoint_name,
    resolve_checkpoint,
    save_tensors,
    verify,
    write_json,
)
from zarvan_dist.training.config import load_run_config


def _write(step: int):
    """A checkpoint's ``write`` function: a tensor file and a JSON file that depend on ``step``."""
    def write(d: Path) -> None:
        save_tensors(d / "model.safetensors", {"w": torch.arange(64.0) + step})
        write_json(d / "trainer.json", {"step": step})
    return write


def _saved(root: Path, steps, keep: int = 10) -> Checkpointer:
    ckpt = Checkpointer(root, keep=keep)
    for step in steps:
        ckpt.save(step, _write(step))
    return ckpt


def _latest(root: Path) -> str:
    return (root / LATEST).read_text().strip()


def test_save_keeps_the_newest_k_and_points_latest_at_the_newest(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    for step in range(1, 6):
        path = ckpt.save(step, _write(step))
        assert path == ckpt.root / checkpoint_name(step)
        assert _latest(ckpt.root) == path.name
        assert [p.name for p in ckpt.checkpoints()] == [checkpoint_name(s) for s in range(max(step - 1, 1), step + 1)]
        meta = verify(path)
        assert meta["step"] == step and set(meta["files"]) == {"model.safetensors", "trainer.json"}
    assert sorted(p.name for p in ckpt.root.iterdir()) == [LATEST, checkpoint_name(4), checkpoint_name(5)]


def test_leftover_tmp_directory_is_never_chosen_and_removed_by_remove_partial(tmp_path):
    ckpt = _saved(tmp_path / "checkpoints", [1, 2])
    # A kill while writing step 3: even complete, with a meta.json that verifies, it is not a checkpoint.
    partial = ckpt.root / f"{TMP_PREFIX}{checkpoint_name(3)}"
    shutil.copytree(ckpt.root / checkpoint_name(2), partial)
    (ckpt.root / f"{TMP_PREFIX}{LATEST}").write_text(partial.name + "\n")
    verify(partial)
    assert partial not in ckpt.checkpoints()
    assert ckpt.find_resume() == ckpt.root / checkpoint_name(2)

    ckpt.remove_partial()
    assert sorted(p.name for p in ckpt.root.iterdir()) == [LATEST, checkpoint_name(1), checkpoint_name(2)]
    verify(ckpt.root / checkpoint_name(2))


def test_save_over_a_leftover_tmp_directory_of_the_same_step(tmp_path):
    ckpt = _saved(tmp_path / "checkpoints", [1])
    partial = ckpt.root / f"{TMP_PREFIX}{checkpoint_name(2)}"
    partial.mkdir()
    (partial / "stale.bin").write_bytes(b"from the killed run")
    path = ckpt.save(2, _write(2))
    assert not partial.exists()
    assert sorted(p.name for p in path.iterdir()) == [META, "model.safetensors", "trainer.json"]


def test_find_resume_falls_back_past_a_corrupt_checkpoint_with_a_warning(tmp_path):
    ckpt = _saved(tmp_path / "checkpoints", [1, 2, 3])
    newest = ckpt.root / checkpoint_name(3) / "model.safetensors"
    os.truncate(newest, newest.stat().st_size // 2)
    with pytest.warns(UserWarning, match=rf"skipping checkpoint {ckpt.root / checkpoint_name(3)}: .*truncated"):
        assert ckpt.find_resume() == ckpt.root / checkpoint_name(2)

    (ckpt.root / checkpoint_name(2) / META).unlink()
    (ckpt.root / checkpoint_name(1) / "trainer.json").unlink()
    # checkpoints there, none usable: an error naming each and why, never a silent fresh start
    with pytest.warns(UserWarning) as warned, pytest.raises(CheckpointError) as caught:
        ckpt.find_resume()
    skipped = [str(w.message).split(": ")[0] for w in warned]
    assert skipped == [f"skipping checkpoint {ckpt.root / checkpoint_name(s)}" for s in (3, 2, 1)]
    message = str(caught.value)
    for s, why in ((3, "truncated"), (2, "meta.json is missing"), (1, "trainer.json is missing")):
        assert f"{checkpoint_name(s)}: " in message and why in message
    assert "nothing was pruned" in message and "--resume none" in message
    assert len(ckpt.checkpoints()) == 3
    assert Checkpointer(tmp_path / "empty", keep=1).find_resume() is None  # no checkpoint at all: a fresh start


def test_pruning_keeps_the_checkpoint_just_written_and_never_counts_an_abandoned_newer_one(tmp_path):
    """A run resumed from step 2 (step 3 damaged) and saving step 3 again, then 4 with keep 1: 4 stays, and
    before it was written the new 3 did; a newer checkpoint than the one written is never what is kept."""
    ckpt = _saved(tmp_path / "checkpoints", [1, 2, 5])
    ckpt.keep = 1
    ckpt.save(3, _write(3))
    assert [p.name for p in ckpt.checkpoints()] == [checkpoint_name(s) for s in (3, 5)]
    ckpt.save(4, _write(4))
    assert [p.name for p in ckpt.checkpoints()] == [checkpoint_name(s) for s in (4, 5)]
    assert _latest(ckpt.root) == checkpoint_name(4)


def test_verify_detects_a_flipped_byte_of_the_same_size(tmp_path):
    path = _saved(tmp_path / "checkpoints", [1]).root / checkpoint_name(1)
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) - 7] ^= 0x01  # inside the tensor data: the file still parses
    target.write_bytes(bytes(data))
    assert target.stat().st_size == json.loads((path / META).read_text())["files"]["model.safetensors"]["bytes"]
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its sha256"):
        verify(path)


def test_resolve_checkpoint_accepts_a_run_dir_a_checkpoints_root_and_a_checkpoint_dir(tmp_path):
    run = tmp_path / "run"
    root = _saved(run / "checkpoints", [1, 2]).root
    newest = root / checkpoint_name(2)
    assert resolve_checkpoint(run) == newest
    assert resolve_checkpoint(str(run)) == newest
    assert resolve_checkpoint(root) == newest
    assert resolve_checkpoint(root / checkpoint_name(1)) == root / checkpoint_name(1)

    flipped = root / checkpoint_name(1) / "trainer.json"
    flipped.write_text(flipped.read_text().replace("1", "7"))
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_checkpoint(root / checkpoint_name(1))


@pytest.mark.parametrize("where", ["empty_dir", "file", "missing"])
def test_resolve_checkpoint_rejects_a_path_that_is_no_checkpoint(tmp_path, where):
    path = tmp_path / where
    if where == "empty_dir":
        path.mkdir()
    elif where == "file":
        path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{path}: not a checkpoint directory, a checkpoints root or a run "):
        resolve_checkpoint(path)


class _Payload:
    """Unpickling it creates a directory: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_loading_a_checkpoint_never_unpickles_code(token_dataset, tmp_path):
    config = run_config(tmp_path, token_dataset)
    trainer = Trainer(load_run_config(config))
    good = trainer.save()
    marker = tmp_path / "code-ran"

    def write(d: Path) -> None:
        for f in good.iterdir():
            if f.name not in (META, "optimizer.pt"):
                shutil.copy(f, d / f.name)
        torch.save({"state": {}, "param_groups": _Payload(marker)}, d / "optimizer.pt")

    # A checkpoint whose meta.json matches: only the loader stands between the pickle and the code.
    evil = trainer.checkpoints.checkpoints.save(1, write)
    verify(evil)
    with pytest.raises(CheckpointError, match="cannot load it .*UnpicklingError.*weights_only"):
        trainer.checkpoints.load(evil, trainer.engine, trainer.rows, seed=0)
    assert not marker.exists()
    # the run passes over it, to the checkpoint before it, with a warning naming both
    with pytest.warns(UserWarning, match=rf"{evil} cannot be resumed .*UnpicklingError.*resuming from {good}"):
        assert trainer.resume() == 0
    assert not marker.exists()
    # The same file unpickled without the guard would have run the code.
    torch.load(evil / "optimizer.pt", weights_only=False)
    assert marker.is_dir()
