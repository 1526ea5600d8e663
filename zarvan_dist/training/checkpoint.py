"""Atomic checkpoint directories: written under a temporary name, renamed when complete, ``latest`` last.

Layout of ``RUN/checkpoints``::

    step-00000100/            one checkpoint (the optimizer step it was taken after)
        model.safetensors     model weights (shared tensors stored once)           engines single, ddp
        optimizer.pt          optimizer state dict (tensors and plain data)        engines single, ddp
        dcp/                  torch.distributed.checkpoint of model + optimizer     engine fsdp (reshardable)
        deepspeed/            DeepSpeed's save_checkpoint (tag "deepspeed")        engine deepspeed
        lanes.safetensors     each row's recurrent state, leading dimension G (global rows)
        rng.safetensors       each rank's torch RNG states (cpu.rank{r}, cuda.rank{r})
        trainer.json          step, micro-step, tokens seen, skipped steps, learning rate, the lanes' shape,
                              engine and world size
        config.yaml           the resolved run config
        meta.json             every other file's size and sha256, subdirectories included (written last)
    latest                    name of the newest complete checkpoint (updated after the rename)
    .tmp-step-00000100/       a checkpoint being written (removed at the next start)

Loading never unpickles arbitrary objects: tensors come from safetensors, DCP or ``torch.load`` with
``weights_only=True``, the rest is JSON and YAML. The exception is DeepSpeed's own files, which
DeepSpeed reads with its own loader (it unpickles): they are checked against meta.json first. A checkpoint whose files do not match its
``meta.json`` is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file, save_file

META = "meta.json"
LATEST = "latest"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its meta.json."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step ``step``."""
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` (not atomic by itself; used inside a temporary directory)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A flat dict of tensors to safetensors (contiguous CPU copies)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of ``save_tensors``."""
    return load_file(str(path), device=str(device))


def save_config(path: Path, config: dict[str, Any]) -> None:
    """The resolved run config as YAML."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))


class Checkpointer:
    """The checkpoints of one run: save atomically, keep the newest K, find the one to resume from."""

    def __init__(self, root: str | Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
        return sorted(found, key=lambda p: p.name)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Create checkpoint ``step``: ``write(tmpdir)`` fills it; then meta, rename, ``latest``, prune."""
        tmp = self.begin(step)
        write(tmp)
        return self.commit(step)

    def begin(self, step: int) -> Path:
        """The empty temporary directory of checkpoint ``step`` (in a job: rank 0 calls it, then a barrier)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{checkpoint_name(step)}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def commit(self, step: int) -> Path:
        """Seal the filled temporary directory: meta.json, rename, ``latest``, prune (rank 0, after a barrier)."""
        final = self.root / checkpoint_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        paths = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in paths:
            _fsync_file(p)
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths}
        write_json(tmp / META, {"step": step, "files": files})
        _fsync_file(tmp / META)
        for d in sorted({p.parent for p in paths}, reverse=True):
            _fsync_dir(d)
        if final.exists():  # the same step saved again (e.g. a re-run after a kill): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.point_latest(final)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def point_latest(self, path: Path) -> None:
        """Make ``latest`` name checkpoint ``path`` (atomically)."""
        latest_tmp = self.root / f"{TMP_PREFIX}{LATEST}"
        latest_tmp.write_text(path.name + "\n")
        _fsync_file(latest_tmp)
        os.replace(latest_tmp, self.root / LATEST)
        _fsync_dir(self.root)

    def remove_partial(self) -> None:
        """Delete temporary directories left by a run killed while saving."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def find_resume(self) -> Path | None:
        """The newest checkpoint that verifies (``latest`` first); each one skipped is warned about."""
        candidates = list(reversed(self.checkpoints()))
        pointer = self.root / LATEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                verify(path)
                return path
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint {path}: {exc}; trying the previous one", stacklevel=2)
        return None


def verify(path: str | Path) -> dict[str, Any]:
    """Check every file of checkpoint ``path`` against its meta.json; returns the meta."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / META} is missing or unreadable ({exc})") from None
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f} has {size} bytes, meta.json says {want['bytes']} (truncated?)")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 in meta.json")
    return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory given itself or a checkpoints root / run directory (its ``latest``)."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file() or Checkpointer(root, keep=1).checkpoints():
            found = Checkpointer(root, keep=1).find_resume()
            if found is None:
                raise CheckpointError(f"{root}: no checkpoint verifies")
            return found
    if not (path / META).is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory, a checkpoints root or a run directory")
    verify(path)
    return path


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_weights(model: torch.nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Load the weights of checkpoint ``path`` into a bare (unwrapped) ``model``, whatever engine wrote them.

    ``model.safetensors`` (single, ddp), ``dcp/`` (fsdp: read without a process group) or
    ``deepspeed/`` (any ZeRO stage: DeepSpeed's ``zero_to_fp32`` consolidation). A model that does
    not fit names the tensors.
    """
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_model

        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    elif (path / "dcp").is_dir():
        missing, unexpected = _load_dcp_weights(model, path / "dcp")
    elif (path / "deepspeed").is_dir():
        missing, unexpected = model.load_state_dict(consolidate_deepspeed(path), strict=False)
    else:
        raise CheckpointError(f"{path}: no model.safetensors, dcp/ or deepspeed/ in this checkpoint")
    if missing or unexpected:
        raise CheckpointError(f"{path}: the checkpoint's weights do not fit this model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def _load_dcp_weights(model: torch.nn.Module, directory: Path) -> tuple[list[str], list[str]]:
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same error to the user
        raise CheckpointError(f"{directory}: unreadable DCP metadata ({exc})") from None
    saved = {k[len("model."):] for k in metadata.state_dict_metadata if k.startswith("model.")}
    wanted = model.state_dict()
    missing = sorted(set(wanted) - saved)
    unexpected = sorted(saved - set(wanted))
    if missing or unexpected:
        return missing, unexpected
    state = {"model": wanted}
    with warnings.catch_warnings():  # "... assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return [], []


def consolidate_deepspeed(path: str | Path) -> dict[str, torch.Tensor]:
    """The full float32 model state dict of a DeepSpeed checkpoint directory (its ``deepspeed/`` tag)."""
    path = Path(path)
    tag = path / "deepspeed"
    stage = json.loads((path / "trainer.json").read_text()).get("zero_stage", 0)
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
        return {k: v.float() for k, v in state.items()}
    # ZeRO stage 0: the whole module is in the model-states file
    files = sorted(tag.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag}: no mp_rank_*_model_states.pt")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in saved["module"].items()}


def weights_source(path: str | Path) -> Path:
    """A ``pretrain.export`` directory as it is; a checkpoint, checkpoints root or run directory resolved
    to one checkpoint and verified (``resolve_checkpoint``)."""
    path = Path(path)
    return path if (path / "export.json").is_file() else resolve_checkpoint(path)


def load_checkpoint_model(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model of a checkpoint (directory, checkpoints root or run directory) or of a ``pretrain.export``
    directory, weights loaded, in eval mode."""
    return load_source_model(weights_source(path), device)


def load_source_model(path: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """``load_checkpoint_model`` of what ``weights_source`` gave (resolved and verified already)."""
    from zarvan_dist.models import ModelConfig, build_model

    config = yaml.safe_load((path / "config.yaml").read_text())
    model = build_model(ModelConfig.from_dict(config["model"])).to(device)
    load_weights(model, path, device)
    return model.eval()
