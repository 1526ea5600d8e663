"""A run's checkpoint: what it holds, saving and resuming it in a job, and opening it to use the model.

Layout of ``RUN/checkpoints``::

    step-00000100/            one checkpoint (the optimizer step it was taken after)
        model.safetensors     model weights (shared tensors stored once)           engines single, ddp
        optimizer.pt          optimizer state dict (tensors and plain data)        engines single, ddp
        dcp/                  torch.distributed.checkpoint of model + optimizer     engine fsdp (reshardable)
        deepspeed/            DeepSpeed's save_checkpoint (tag "deepspeed")        engine deepspeed
        lanes.safetensors     each row's recurrent state, leading dimension G (global rows)
        rng.safetensors       each rank's torch RNG states (cpu.rank{r}, cuda.rank{r})
        trainer.json          step, micro-step, tokens seen, skipped steps, learning rate, the lanes' shape,
                              engine (and ZeRO stage) and world size
        config.yaml           the resolved run config
        meta.json             every other file's size and sha256, subdirectories included (written last)
    latest                    name of the newest complete checkpoint (updated after the rename)
    .tmp-step-00000100/       a checkpoint being written (removed at the next start)

Three layers: ``Checkpointer`` keeps the directories of a run (atomic commit, ``latest``, pruning,
the newest that verifies); ``RunCheckpointer`` saves and restores everything a run needs to go on
(model, optimizer, lanes, RNG per rank, counters) with the collectives that takes, every rank
calling it and rank 0 sealing; ``open_checkpoint`` opens a checkpoint, or an export of one, for a
job that only uses the model: its config, step, model, tokenizer and dataset, every failure a
``CheckpointError``.

Loading never unpickles arbitrary objects: tensors come from safetensors, DCP or ``torch.load`` with
``weights_only=True``, the rest is JSON and YAML. The exception is DeepSpeed's own files, which
DeepSpeed reads with its own loader (it unpickles): they are checked against meta.json first. A checkpoint whose files do not match its
``meta.json`` is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zarvan_dist.config import ConfigError, load_yaml
from zarvan_dist.data.manifest import Manifest, dataset_root
from zarvan_dist.models import CausalLM, ModelConfig, RecurrentState, build_model
from zarvan_dist.tokenizer import Tokenizer, TokenizerError, check_tokenizer, load_tokenizer
from zarvan_dist.training.config import RunConfig

if TYPE_CHECKING:
    from zarvan_dist.training.engines import Collective, DistEnv, Engine

META = "meta.json"
LATEST = "latest"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
# the files of a checkpoint directory (see the module docstring)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
DCP_DIR = "dcp"
DS_TAG = "deepspeed"
LANES_FILE = "lanes.safetensors"
RNG_FILE = "rng.safetensors"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
# an export's (pretrain.export): native, or for transformers (zarvan_dist.hf)
EXPORT_FILE = "export.json"
HF_CONFIG_FILE = "config.json"
HF_MODEL_TYPE = "zarvan_dist"
"""config.json's ``model_type`` in a transformers export."""
HF_PREFIX = "model."
"""Where the wrapped model's weights live in a transformers export's state dict."""
TOKENIZER_FILE = "tokenizer.model"
FORMATS = {"single": "full", "ddp": "full", "fsdp": "dcp", "deepspeed": "deepspeed"}
"""Checkpoint format of each engine: ``full`` (model.safetensors + optimizer.pt), ``dcp`` (DCP files
under ``dcp/``) or ``deepspeed`` (DeepSpeed's files under ``deepspeed/``)."""


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
        # the newest keep - 1 before it stay; any after it (a timeline a resume from an older one abandoned)
        # are not counted, never pruned: the checkpoint just written is always among those kept
        older = [p for p in self.checkpoints() if p.name < final.name]
        for old in older[:max(len(older) - (self.keep - 1), 0)]:
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

    def find_resume(self, below: str | None = None, failed: Sequence[str] = ()) -> Path | None:
        """The newest checkpoint that verifies (``latest`` first; only those named before ``below`` when
        given); each one skipped is warned about. None when there is no checkpoint at all; a
        CheckpointError listing each one and why (after ``failed``: those that failed before) when there
        are some and none verifies."""
        candidates = [p for p in reversed(self.checkpoints()) if below is None or p.name < below]
        pointer = self.root / LATEST
        if pointer.is_file() and below is None:
            named = self.root / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        invalid = list(failed)
        for path in candidates:
            try:
                verify(path)
                return path
            except CheckpointError as exc:
                invalid.append(f"{path.name}: {exc}")
                warnings.warn(f"skipping checkpoint {path}: {exc}; trying the previous one", stacklevel=2)
        if invalid:
            raise CheckpointError(unusable(self.root, invalid))
        return None

def unusable(root: Path, invalid: list[str]) -> str:
    """The message of a run whose checkpoints all fail: each one and why, and what to do."""
    return (f"{root}: no checkpoint can be resumed ({'; '.join(invalid)}); nothing was pruned: repair or restore "
            f"one, resume from a copy with --resume PATH, or start the run over with --resume none")


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
    """Load the weights of checkpoint or export ``path`` into a bare (unwrapped) ``model``, whatever wrote them.

    ``model.safetensors`` (engines single, ddp; a native export; a transformers export, under
    ``model.``), ``dcp/`` (fsdp: read without a process group) or ``deepspeed/`` (any ZeRO stage:
    DeepSpeed's ``zero_to_fp32`` consolidation). A model that does not fit names the tensors.
    """
    path = Path(path)
    if (path / MODEL_FILE).is_file() and is_hf_export(path):
        missing, unexpected = _load_hf_weights(model, path / MODEL_FILE, device)
    elif (path / MODEL_FILE).is_file():
        from safetensors.torch import load_model

        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False, device=str(device))
    elif (path / DCP_DIR).is_dir():
        missing, unexpected = _load_dcp_weights(model, path / DCP_DIR)
    elif (path / DS_TAG).is_dir():
        missing, unexpected = model.load_state_dict(consolidate_deepspeed(path), strict=False)
    else:
        raise CheckpointError(f"{path}: no {MODEL_FILE}, {DCP_DIR}/ or {DS_TAG}/ in this checkpoint")
    if missing or unexpected:
        raise CheckpointError(f"{path}: the checkpoint's weights do not fit this model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def is_hf_export(path: Path) -> bool:
    """A directory written by ``zarvan_dist.hf.write_hf`` (its config.json names model_type zarvan_dist)."""
    try:
        return json.loads((path / HF_CONFIG_FILE).read_text()).get("model_type") == HF_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def _load_hf_weights(model: torch.nn.Module, file: Path, device: torch.device | str) -> tuple[list[str], list[str]]:
    weights = load_file(str(file), device=str(device))
    foreign = [k for k in weights if not k.startswith(HF_PREFIX)]
    missing, unexpected = model.load_state_dict({k[len(HF_PREFIX):]: v for k, v in weights.items()}, strict=False)
    if getattr(model.config, "tie_embeddings", False):  # stored once, as the embedding
        missing = [k for k in missing if k != "head.weight"]
    return list(missing), foreign + list(unexpected)


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
    tag = path / DS_TAG
    stage = json.loads((path / TRAINER_FILE).read_text()).get("zero_stage", 0)
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
        return {k: v.float() for k, v in state.items()}
    # ZeRO stage 0: the whole module is in the model-states file
    files = sorted(tag.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag}: no mp_rank_*_model_states.pt")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in saved["module"].items()}



# ---------------------------------------------------------------- opening a checkpoint to use its model
@dataclass
class Checkpoint:
    """A checkpoint, or an export of one, opened to use its model (``open_checkpoint``).

    Everything it reads is checked; every failure is a ``CheckpointError`` whose message names the
    file, key or value at fault.
    """

    path: Path
    """The checkpoint or export directory (resolved, verified, absolute)."""
    config: dict
    """The run config as saved (an export's holds the model only)."""
    info: dict
    """trainer.json of a checkpoint, export.json (or config.json's ``zarvan_export``) of an export."""
    model_config: ModelConfig

    @property
    def is_export(self) -> bool:
        return not (self.path / TRAINER_FILE).is_file()

    @property
    def step(self) -> int | None:
        """The optimizer step of the weights."""
        return self.info.get("step")

    @property
    def engine(self) -> str:
        """The engine that wrote the weights."""
        return self.info.get("engine", "single")

    def run_config(self, overrides: list[str] | None = None) -> RunConfig:
        """The run config the checkpoint was trained with (``key=value`` overrides applied)."""
        from zarvan_dist.config import apply_overrides

        if self.is_export:
            raise CheckpointError(f"{self.path} is an export: it keeps the model, not the run config; "
                                  f"give the checkpoint it was exported from ({self.info.get('source')})")
        try:
            return RunConfig.from_dict(apply_overrides(self.config, overrides or []))
        except ConfigError as exc:
            raise CheckpointError(f"{self.path / CONFIG_FILE}: {exc}") from None

    def dataset(self) -> str | None:
        """The dataset the run read (``data.dir``), followed from an export to its source checkpoint."""
        data = self.config.get("data") or {}
        if data.get("dir"):
            return str(data["dir"])
        source = self.info.get("source")
        if source:
            try:
                return str(yaml.safe_load((Path(source) / CONFIG_FILE).read_text())["data"]["dir"])
            except (OSError, KeyError, TypeError, yaml.YAMLError):
                return None
        return None

    def manifest(self, dataset: str | None = None) -> Manifest:
        """The manifest of ``dataset`` (default: the run's)."""
        dataset = dataset or self.dataset()
        if dataset is None:
            raise CheckpointError(f"{self.path}: the checkpoint names no dataset (data.dir)")
        try:
            return Manifest.load(dataset)
        except (ConfigError, ImportError, OSError, ValueError) as exc:  # e.g. s3:// without s3fs, moved away
            raise CheckpointError(f"the run's dataset is not readable: {exc}") from None

    def load_model(self, device: torch.device | str = "cpu") -> CausalLM:
        """The model with its weights, in eval mode."""
        model = build_model(self.model_config).to(device)
        load_weights(model, self.path, device)
        return model.eval()

    def tokenizer(self, explicit: str | None = None, dataset: str | None = None) -> Tokenizer:
        """The tokenizer that goes with the model, checked (``zarvan_dist.tokenizer.check_tokenizer``).

        ``explicit`` (a URL) if given, else the export's ``tokenizer.model``, else the one of the
        run's dataset (or ``dataset``). It must have the model's vocabulary and, when the dataset's
        manifest is readable, be the model file it recorded.
        """
        dataset = dataset or self.dataset()
        manifest, why = None, "the checkpoint names no dataset (data.dir)"
        if dataset is not None:
            try:
                manifest = self.manifest(dataset)
            except CheckpointError as exc:
                why = str(exc)
        if explicit:
            url = explicit
        elif (self.path / TOKENIZER_FILE).is_file():
            url = str(self.path / TOKENIZER_FILE)
        elif manifest is not None:
            url = f"{dataset_root(dataset)}/{manifest.tokenizer.path}"
        else:
            raise CheckpointError(f"no tokenizer for {self.path}: {why}; give --tokenizer")
        try:
            tokenizer = load_tokenizer(url)
            check_tokenizer(tokenizer, self.model_config.vocab_size, manifest, dataset)
        except TokenizerError as exc:
            raise CheckpointError(str(exc)) from None
        if manifest is None and explicit and dataset is not None:  # named, but not readable
            print(f"note: {why}; the tokenizer {url} is not checked against it", file=sys.stderr)
        return tokenizer


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory, a run directory or checkpoints root (its newest checkpoint that
    verifies), or a ``pretrain.export`` directory (native or transformers)."""
    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (given / EXPORT_FILE).is_file():
        resolved = given
        info = _read_json(given / EXPORT_FILE)
        config = _read_yaml(given / CONFIG_FILE)
    elif is_hf_export(given):
        resolved = given
        hf = _read_json(given / HF_CONFIG_FILE)
        info, config = dict(hf.get("zarvan_export") or {}), {"model": hf.get("zarvan_model")}
    else:
        resolved = resolve_checkpoint(given)
        info = _read_json(resolved / TRAINER_FILE)
        config = _read_yaml(resolved / CONFIG_FILE)
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{resolved}: its config holds no model section")
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{resolved}: model: {exc}") from None
    return Checkpoint(resolved.absolute(), config, info, model_config)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_yaml(path: Path) -> dict:
    try:
        data = load_yaml(path)
    except (OSError, ConfigError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping")
    return data


# ---------------------------------------------------------------- saving and resuming a run
@dataclass
class Counters:
    """The trainer's progress; saved in every checkpoint's ``trainer.json``."""

    step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-steps done: the lanes' cursor."""
    tokens: int = 0
    """Target tokens trained on (all rows)."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient norm."""
    bad_in_row: int = 0
    """Non-finite steps since the last good one."""
    pending_eval: int = 0
    """The step whose evaluation a stop skipped (0: none): run first after the resume."""
    lanes_from: int = 0
    """The micro-step where the current lane layout began (a resume with ``checkpoint.resume_reweight`` starts
    new lanes there): the lanes' cursor is ``micro_step - lanes_from``."""

    @property
    def lane_step(self) -> int:
        """The lanes' cursor: micro-steps since the current lane layout began."""
        return self.micro_step - self.lanes_from

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, data: dict[str, int]) -> None:
        for key, value in data.items():
            if hasattr(self, key):
                setattr(self, key, int(value))


class RunCheckpointer:
    """Save and resume a run's checkpoints in a job of ``env.world`` ranks: every rank calls ``save`` and
    ``load``; rank 0 alone looks for the checkpoint to resume, writes the shared files and seals."""

    def __init__(self, root: str | Path, keep: int, env: DistEnv, comm: Collective, device: torch.device) -> None:
        self.checkpoints = Checkpointer(root, keep)
        self.env, self.comm, self.device = env, comm, device
        self._found: dict[str, Path | None] = {}
        self._invalid: list[str] = []  # checkpoints that failed to load, and why

    @property
    def root(self) -> Path:
        return self.checkpoints.root

    def resume_path(self, mode: str) -> Path | None:
        """The checkpoint ``mode`` names (``auto``: the newest that verifies, ``none``, or a path); None:
        start afresh. Rank 0 looks (once), every rank gets its answer or its error."""
        if mode not in self._found:
            found, error = None, None
            if self.env.main:
                try:
                    self.checkpoints.remove_partial()
                    if mode == "auto":
                        found = self.checkpoints.find_resume()
                    elif mode != "none":
                        found = resolve_checkpoint(mode)
                except (CheckpointError, OSError) as exc:
                    error = str(exc)
            # every rank learns rank 0's answer, or its error: none is left waiting in a collective
            found, error = self.comm.broadcast((str(found) if found else None, error))
            if error is not None:
                raise CheckpointError(error)
            self._found[mode] = Path(found) if found else None
        return self._found[mode]

    def older_than(self, path: Path, why: str) -> Path | None:
        """After checkpoint ``path`` of this run failed to load (``why``): the newest older one that verifies,
        or None. Rank 0 looks, every rank gets its answer; an error when none is left."""
        self._invalid.append(f"{path.name}: {why}")
        found, error = None, None
        if self.env.main:
            try:
                found = self.checkpoints.find_resume(below=path.name, failed=self._invalid)
            except CheckpointError as exc:
                error = str(exc)
        found, error = self.comm.broadcast((str(found) if found else None, error))
        if found is None:
            raise CheckpointError(error or unusable(self.root, self._invalid))
        warnings.warn(f"checkpoint {path} cannot be resumed ({why}); resuming from {found}", stacklevel=2)
        return Path(found)

    def save(self, step: int, engine: Engine, counters: Counters, lane_state: RecurrentState, lr: float,
             lanes_info: dict[str, Any], seq_len: int, config: dict, dataset_sha256: str) -> Path:
        """Write checkpoint ``step-N``: the engine's files, every row's lane state, each rank's RNG,
        ``trainer.json`` (``counters``, ``lr``, the lanes' shape ``lanes_info``: ``train_windows`` of one dataset
        or the ``sources`` of a mixture, engine, world size, the sha256 of the dataset's manifest) and
        ``config``. A write that fails on any rank (a full disk, a lost mount) is
        one CheckpointError on every rank; the partial directory is removed and ``latest`` stays."""
        main = self.env.main
        tmp = self.checkpoints.begin(step) if main else None
        tmp = Path(self.comm.broadcast(str(tmp) if tmp else None))
        error = None
        try:
            engine.save(tmp)
            lanes = self.comm.gather_rows(lane_state.to_dict())
            rngs = self.comm.gather_objects(_rng_state(self.device))
            if main:
                save_tensors(tmp / LANES_FILE, lanes)
                save_tensors(tmp / RNG_FILE, {f"{name}.rank{r}": t for r, rng in enumerate(rngs)
                                              for name, t in rng.items()})
                write_json(tmp / TRAINER_FILE, {**counters.state_dict(), "lr": lr, **lanes_info, "seq_len": seq_len,
                                                "world_size": self.env.world, "dataset_sha256": dataset_sha256,
                                                **engine.checkpoint_info()})
                save_config(tmp / CONFIG_FILE, config)
        except (OSError, RuntimeError, ValueError) as exc:  # torch.save reports a full disk as a RuntimeError
            error = f"rank {self.env.rank}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        errors = [e for e in self.comm.gather_objects(error) if e]
        if errors:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = self.root / LATEST
            kept = latest.read_text().strip() if latest.is_file() else "none"
            raise CheckpointError(f"cannot write checkpoint {checkpoint_name(step)} in {self.root} ({errors[0]}); "
                                  f"it was removed and latest stays {kept}: free space or fix the storage, then "
                                  f"resume")
        self.comm.barrier()
        if main:
            self.checkpoints.commit(step)
        self.comm.barrier()
        return self.root / checkpoint_name(step)

    def check_resumable(self, path: Path, cfg: RunConfig, model: dict, lanes_info: dict[str, Any], seq_len: int,
                        engine: Engine, dataset_sha256: str) -> bool:
        """Refuse checkpoint ``path`` where its model (``model``: this run's resolved model config), lanes
        (``lanes_info``, as ``save`` writes them), dataset or engine's files do not fit this run, naming the key and
        both values. Returns True where the lanes start afresh: a mixture changed under
        ``checkpoint.resume_reweight``."""
        raw = load_yaml(path / CONFIG_FILE)
        saved = RunConfig.from_dict(raw)
        info = json.loads((path / TRAINER_FILE).read_text())
        saved_model = raw.get("model") or {}
        changed = sorted(k for k in set(saved_model) | set(model) if saved_model.get(k) != model.get(k))
        if changed and not _same_shapes(saved_model, model):
            shown = ", ".join(f"model.{k}: {saved_model.get(k)!r} in the checkpoint, {model.get(k)!r} now"
                              for k in changed)
            raise ConfigError(f"{shown}: the weights of {path} do not fit this model; resume with the checkpoint's "
                              f"model, or start a new run (--resume none)")
        mixture = [(s.name, s.dir, s.weight) for s in saved.data.sources]
        new_lanes = mixture != [(s.name, s.dir, s.weight) for s in cfg.data.sources]
        if new_lanes and not cfg.checkpoint.resume_reweight:
            shown = lambda sources: ", ".join(f"{n} ({d}, weight {w:g})" for n, d, w in sources) or "data.dir only"
            raise ConfigError(f"data.sources: the checkpoint {path} was trained on {shown(mixture)}, this run "
                              f"reads {shown([(s.name, s.dir, s.weight) for s in cfg.data.sources])}; set "
                              f"checkpoint.resume_reweight: true (--resume-reweight) to go on from its weights "
                              f"with the new lanes from their start and fresh states, or resume with the "
                              f"checkpoint's sources")
        checks = {"seq_len": (info.get("seq_len"), seq_len)}
        if not new_lanes:  # the lanes go on where they were: their shape must be the same
            checks.update({"data.rows": (saved.data.rows, cfg.data.rows),
                           "data.rotation_seed": (saved.data.rotation_seed, cfg.data.rotation_seed),
                           "train windows": (info.get("train_windows"), lanes_info.get("train_windows")),
                           "sources": (info.get("sources"), lanes_info.get("sources"))})
        for name, (was, now) in checks.items():
            if was != now and not (was is None and name in ("train windows", "seq_len")):  # older trainer.json
                raise ConfigError(f"{name}: the checkpoint {path} was taken with {was}, this run has {now}; "
                                  f"its lane cursor and states would not fit (start afresh with --resume none)")
        was = info.get("dataset_sha256")
        if not new_lanes and was is not None and was != dataset_sha256 and not cfg.checkpoint.allow_other_data:
            if isinstance(was, list):  # a mixture: one per source
                i = next(i for i, (a, b) in enumerate(zip(was, dataset_sha256)) if a != b)
                where, was, now = f"data.sources[{i}] ({cfg.data.sources[i].name})", was[i], dataset_sha256[i]
                url = cfg.data.sources[i].dir
            else:
                where, now, url = "data.dir", dataset_sha256, cfg.data.dir
            raise ConfigError(f"{where}: the checkpoint {path} was trained on a dataset whose manifest has sha256 "
                              f"{was[:12]}..., the manifest of {url} has {now[:12]}... (another "
                              f"dataset, or one written again); set checkpoint.allow_other_data: true to resume on it "
                              f"anyway (each lane goes on at its window index), or start afresh with --resume none")
        if saved.data.neighbours != cfg.data.neighbours and self.env.main:
            # a moved sidecar (another URL, same files) is fine; another one changes what the model reads
            print(f"note: the checkpoint {path} was trained with data.neighbours {saved.data.neighbours}, "
                  f"this run reads {cfg.data.neighbours}", file=sys.stderr)
        written_by = info.get("engine", "single")
        if FORMATS[written_by] != engine.format:
            raise ConfigError(f"engine: the checkpoint {path} was written by engine {written_by}, whose files "
                              f"engine {engine.name} cannot resume; resume with engine: {written_by}, or start a "
                              f"new run from its weights: --set checkpoint.init_from={path} --resume none")
        return new_lanes

    def load(self, path: Path, engine: Engine, rows: range, seed: int,
             universal: Path | None = None) -> tuple[RecurrentState | None, Counters]:
        """Restore the engine's files (from ``universal``, DeepSpeed's conversion, when given), this rank's
        ``rows`` of the lane states (None when ``rows`` is empty: new lanes), its RNG and the counters of
        checkpoint ``path`` (checked already)."""
        error = None
        try:
            if universal is not None:
                engine.load(universal)
            else:
                engine.load(path)
            lane_state = None
            if len(rows):
                state = load_tensors(path / LANES_FILE)  # every row, on the CPU: this rank takes its own
                lane_state = RecurrentState({k: v[rows.start:rows.stop].contiguous().to(self.device)
                                             for k, v in state.items()})
            info = json.loads((path / TRAINER_FILE).read_text())
            rng = load_tensors(path / RNG_FILE)
        except _LOAD_ERRORS as exc:  # files that verified against meta.json but cannot be read
            error = f"rank {self.env.rank}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        errors = [e for e in self.comm.gather_objects(error) if e]
        if errors:
            raise CheckpointError(f"cannot load it ({errors[0]})")
        if universal is not None:
            self.comm.barrier()
            if self.env.main:
                shutil.rmtree(universal, ignore_errors=True)
        self._load_rng(rng, info.get("world_size", 1), int(info["step"]), seed)
        counters = Counters()
        counters.load_state_dict({k: v for k, v in info.items() if k in counters.state_dict()})
        if self.env.main and path.parent.resolve() == self.root.resolve():
            self.checkpoints.point_latest(path)  # a requeue with auto continues from here, not a newer abandoned one
        return lane_state, counters

    def _load_rng(self, rng: dict[str, torch.Tensor], saved_world: int, step: int, seed: int) -> None:
        rank = self.env.rank
        if "cpu" in rng:  # written before the ranks were recorded: one process
            rng = {"cpu.rank0": rng["cpu"]}
        if saved_world != self.env.world or f"cpu.rank{rank}" not in rng:
            # another world size: a rank's stream cannot be carried over; a fresh, reproducible one
            torch.manual_seed(seed + 1_000_003 * step + rank)
            if self.env.main:
                print(f"note: the checkpoint was written by {saved_world} ranks, this run has {self.env.world}: "
                      f"each rank's dropout stream is seeded anew", file=sys.stderr)
            return
        torch.set_rng_state(rng[f"cpu.rank{rank}"])
        if self.device.type == "cuda" and f"cuda.rank{rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], self.device)

    def prepare_universal(self, path: Path | None, engine: str, zero_stage: int) -> Path | None:
        """DeepSpeed resuming a ZeRO checkpoint of another world size: its universal conversion (rank 0
        writes it); None where no conversion is needed."""
        if engine != "deepspeed" or path is None:
            return None
        saved = json.loads((path / TRAINER_FILE).read_text())
        if saved.get("engine") != "deepspeed":
            return None  # check_resumable refuses another engine's checkpoint with a clear message
        was = saved.get("zero_stage", 0)
        if was != zero_stage:  # DeepSpeed's loaders expect the stage's own file layout
            raise ConfigError(f"deepspeed.zero_stage: the checkpoint {path} was written with ZeRO stage {was}, this "
                              f"run has {zero_stage}; resume with zero_stage {was}, or start a new run from its "
                              f"weights: --set checkpoint.init_from={path} --resume none")
        if saved.get("world_size", 1) == self.env.world or was == 0:
            return None  # same partitioning, or ZeRO-0 (nothing partitioned)
        from zarvan_dist.training.engines import convert_to_universal

        target = self.root / f"{TMP_PREFIX}universal-{path.name}"
        if self.env.main:
            print(f"converting {path} ({saved.get('world_size')} ranks) to a universal checkpoint for "
                  f"{self.env.world} ranks", flush=True)
            shutil.rmtree(target, ignore_errors=True)
            convert_to_universal(path, target)
        self.comm.barrier()
        return target


_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)
"""What reading a damaged checkpoint file raises (safetensors, torch.load, DCP, DeepSpeed, JSON)."""


def _same_shapes(saved: dict, now: dict) -> bool:
    """Whether models of the two configs have the same parameter names and shapes (built on the meta device)."""
    try:
        with torch.device("meta"):
            a, b = build_model(ModelConfig.from_dict(saved)), build_model(ModelConfig.from_dict(now))
    except ConfigError:
        return False
    return {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and, on a GPU, its device's."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng
