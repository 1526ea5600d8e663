"""Engines: how one model is wrapped for training, without touching the model files.

``single``    one process (CPU or one GPU)
``ddp``       torch DistributedDataParallel: every rank holds the whole model and optimizer
``fsdp``      FSDP2 ``fully_shard`` per block then the root, mixed-precision policy, optional CPU
              offload; checkpoints through torch.distributed.checkpoint (DCP), reshardable
``deepspeed`` ``deepspeed.initialize`` with a ZeRO stage 0-3 and optional offload; checkpoints in
              DeepSpeed's own format, converted to a universal checkpoint to change world size

Every engine gives the trainer the same four verbs: ``forward``, ``backward`` (one micro-step),
``step`` (clip, set the learning rate, update; skipped when not finite) and ``save`` / ``load``
of the model and optimizer files inside a checkpoint directory. The process group comes from
the launcher's environment (torchrun and the deepspeed launcher set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a distributed engine started without a launcher runs as
a world of one. The backend is NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch import nn

from zarvan_dist.config import ConfigError, load_yaml
from zarvan_dist.training.checkpoint import (
    DCP_DIR,
    DS_TAG,
    FORMATS,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    load_weights,
)
from zarvan_dist.training.config import DeepSpeedConfig, FSDPConfig

if TYPE_CHECKING:
    from zarvan_dist.training.config import RunConfig


# ---------------------------------------------------------------- the process group
@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes metrics, TensorBoard and the checkpoint's shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launcher_env() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun and the deepspeed launcher set them (a world of one without)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK in the environment are not integers: {exc}") from None


def init_distributed(engine: str, device: torch.device, timeout_minutes: float = 60.0,
                     cpu_collectives: bool = False) -> tuple[DistEnv, torch.device]:
    """Join the launcher's process group for a distributed engine; returns the rank and its device.

    ``single`` refuses a launcher world larger than one (it would train the same rows on every rank).
    On GPUs each rank takes ``cuda:LOCAL_RANK`` and NCCL (plus gloo for CPU tensors when
    ``cpu_collectives``: FSDP2's CPU offload reduces CPU gradients); on CPU the backend is gloo.
    ``timeout_minutes`` bounds a collective wait (rank 0 alone hashes and seals each checkpoint).
    """
    env = launcher_env()
    if engine == "single":
        if env.world > 1:
            raise ConfigError(f"engine: single trains in one process, but the launcher started WORLD_SIZE={env.world}; "
                              f"set engine to ddp, fsdp or deepspeed")
        return env, device
    if device.type == "cuda":
        if device.index is not None and env.world > 1:
            raise ConfigError(f"train.device: {device} would put every rank on one GPU; use cuda or auto "
                              f"(each rank takes cuda:LOCAL_RANK)")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return env, device
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    if env.world > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise ConfigError(f"WORLD_SIZE={env.world} but MASTER_ADDR / MASTER_PORT are not set: start the job with "
                          f"torchrun, the deepspeed launcher or launch/*.sh")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "gloo"
    if device.type == "cuda":
        backend = "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
    timeout = timedelta(minutes=timeout_minutes)
    if engine == "deepspeed":
        deepspeed = _import_deepspeed()
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank), device


def shutdown_distributed(finished: bool = False) -> None:
    """Destroy the process group. ``finished``: every rank ended the job normally, so all of them meet
    at a barrier first (none tears its connections down while a peer still uses them), after a garbage
    collection that frees the wrapped model's pending communication before its group goes: a gloo
    rank otherwise aborted at exit now and then ("terminate called without an active exception").
    After an error no barrier is waited for (the other ranks may never come)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("engine: deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'") from None
    return deepspeed


class Collective:
    """The few collectives the trainer needs, as no-ops in a world of one."""

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        self.env = env
        # gloo reduces CPU tensors, NCCL CUDA ones
        self.device = device if device.type == "cuda" else torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.env.world > 1 and self.env.distributed

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of each entry over the ranks (every rank has the same keys)."""
        keys = sorted(values)
        sums = self.sum([values[k] for k in keys])
        return {k: v / self.env.world for k, v in zip(keys, sums)}

    def max(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (plain data)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rows(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor's rows of every rank, in rank order (dimension 0 concatenated)."""
        if not self.active:
            return tensors
        out = {}
        for name in sorted(tensors):
            t = tensors[name].detach().to(self.device).contiguous()
            parts = [torch.empty_like(t) for _ in range(self.env.world)]
            dist.all_gather(parts, t)
            out[name] = torch.cat(parts).cpu()
        return out

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (plain data or CPU tensors), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.env.world
        dist.all_gather_object(out, obj)
        return out


# ---------------------------------------------------------------- engines
class Engine:
    """A model and its optimizer wrapped for training; ``module`` is the bare model."""

    name = "single"

    def __init__(self, module: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 env: DistEnv, device: torch.device, grad_accum: int) -> None:
        self.module = module
        self.env = env
        self.device = device
        self.grad_accum = grad_accum
        self.wrapped, self.optimizer = self.build(module, make_optimizer)

    def build(self, module: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
              ) -> tuple[nn.Module, Any]:
        """The wrapped model and its optimizer (built over the wrapped parameters)."""
        wrapped = self.wrap(module)
        return wrapped, make_optimizer(module)

    @property
    def format(self) -> str:
        return FORMATS[self.name]

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint's trainer.json records of the engine that wrote it."""
        return {"engine": self.name}

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def forward(self, *args: Any) -> Any:
        return self.wrapped(*args)

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    @property
    def training(self) -> bool:
        return self.module.training

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-step's mean loss; ``last``: the micro-step that ends the optimizer step."""
        (loss / self.grad_accum).backward()

    def grad_norm(self, clip: float) -> float:
        """The global gradient norm before clipping; gradients clipped to ``clip``."""
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))

    def step(self, lr: float, clip: float, loss_finite: bool) -> tuple[float, bool]:
        """Clip, then update with learning rate ``lr`` when the loss and gradient norm are finite.

        Returns the gradient norm and whether the update was applied (every rank decides alike:
        the loss is reduced over the ranks and the norm is global).
        """
        norm = self.grad_norm(clip)
        if loss_finite and math.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            return norm, True
        self.zero_grad()
        return norm, False

    # ---- checkpoint files (collective: every rank calls them)
    def save(self, directory: Path) -> None:
        """Model and optimizer into checkpoint ``directory`` (model.safetensors, optimizer.pt)."""
        if self.env.main:
            save_model(self.module, str(directory / MODEL_FILE))
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        load_weights(self.module, directory, self.device)
        state = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)


class DDPEngine(Engine):
    """Data parallel with the whole model on every rank; gradients averaged at the last micro-step."""

    name = "ddp"

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        with contextlib.nullcontext() if last else self.wrapped.no_sync():
            (loss / self.grad_accum).backward()


class FSDPEngine(Engine):
    """FSDP2: ``fully_shard`` on every block, then the root; DCP checkpoints under ``dcp/``."""

    name = "fsdp"

    def __init__(self, module: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 env: DistEnv, device: torch.device, grad_accum: int, fsdp: FSDPConfig, dtype: torch.dtype) -> None:
        self.fsdp, self.dtype = fsdp, dtype  # wrap() reads them
        super().__init__(module, make_optimizer, env, device, grad_accum)

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        f, dtype = self.fsdp, self.dtype
        # parameters gathered in the compute dtype, gradients reduced in float32; block inputs are not
        # cast (the carried recurrent state stays float32 across windows)
        mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
        offload = CPUOffloadPolicy() if f.cpu_offload else OffloadPolicy()
        kwargs = dict(mp_policy=mp, offload_policy=offload)
        # the blocks return their new recurrent state as slices (views) of their activations; the trainer
        # detaches them and never writes them in place before backward, which is what the warning is about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for block in module.blocks:
            fully_shard(block, reshard_after_forward=f.reshard_after_forward, **kwargs)
        fully_shard(module, reshard_after_forward=False, **kwargs)
        return module

    def grad_norm(self, clip: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optim}

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory / DCP_DIR))

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with the run's ZeRO stage; DeepSpeed's checkpoint under ``deepspeed/``."""

    name = "deepspeed"

    def __init__(self, module: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 env: DistEnv, device: torch.device, grad_accum: int, ds_config: dict[str, Any]) -> None:
        self.ds_config = ds_config
        super().__init__(module, make_optimizer, env, device, grad_accum)
        self.module = self.wrapped.module

    def checkpoint_info(self) -> dict[str, Any]:
        return {"engine": self.name, "zero_stage": self.ds_config["zero_optimization"]["stage"]}

    def build(self, module: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
              ) -> tuple[nn.Module, Any]:
        deepspeed = _import_deepspeed()
        # DeepSpeed's ZeRO calls torch's old collective names on every step
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
        engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=make_optimizer(module),
                                                       config=self.ds_config)
        return engine, optimizer

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears gradients after its step

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # DeepSpeed divides by gradient_accumulation_steps and reduces at the boundary; step() only
        # advances its micro-step counter until then
        self.wrapped.backward(loss)
        if not last:
            if self.wrapped.is_gradient_accumulation_boundary():
                raise RuntimeError("DeepSpeed's accumulation boundary is out of step with the trainer's")
            self.wrapped.step()

    def step(self, lr: float, clip: float, loss_finite: bool) -> tuple[float, bool]:
        engine = self.wrapped
        if not engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's accumulation boundary is out of step with the trainer's")
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        skipped = engine.skipped_steps
        if engine.zero_optimization_stage() == 0:
            # stage 0 steps the torch optimizer without an overflow check: clip here, and where the step
            # is not finite drop every gradient (AdamW leaves a parameter without one untouched); the
            # engine still steps so that its counters stay in line with the trainer's
            norm = self.grad_norm(clip)
            if not (loss_finite and math.isfinite(norm)):
                for p in self.module.parameters():
                    p.grad = None
                engine.step()
                return norm, False
        engine.step()
        if engine.zero_optimization_stage() != 0:
            norm = engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else math.nan
        # ZeRO 1-3 skip a step themselves when their optimizer sees a non-finite gradient norm
        applied = engine.skipped_steps == skipped
        return norm, applied and loss_finite and math.isfinite(norm)

    def save(self, directory: Path) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # the marker ds_to_universal requires of ZeRO-1/2 checkpoints (a world-size change converts them)
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.wrapped.save_checkpoint(str(directory), tag=DS_TAG, client_state=info, save_latest=False)

    def load(self, directory: Path, tag: str = DS_TAG) -> None:
        path, _ = self.wrapped.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {directory / tag}")


def build_engine(module: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], cfg: RunConfig,
                 env: DistEnv, device: torch.device, load_universal: bool = False) -> Engine:
    """Wrap ``module`` (activation checkpointing and compilation already applied) for ``cfg.engine``."""
    args = (module, make_optimizer, env, device, cfg.train.grad_accum)
    if cfg.engine == "fsdp":
        return FSDPEngine(*args, cfg.fsdp, resolve_dtype(cfg.train.dtype, device))
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(*args, deepspeed_config(cfg.deepspeed, cfg.data.rows // env.world, env.world,
                                                       cfg.train.grad_accum, cfg.optim.grad_clip, load_universal))
    return DDPEngine(*args) if cfg.engine == "ddp" else Engine(*args)


def resolve_device(name: str) -> torch.device:
    """``auto`` is the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: ``auto`` is bfloat16 on a GPU that supports it, float32 otherwise."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype, cache: bool = True) -> contextlib.AbstractContextManager:
    """The forward's compute precision: autocast to ``dtype`` (nothing for float32). Sharded engines
    pass ``cache=False``: they gather and free weights per block, and autocast's cache would keep a
    low-precision copy of every gathered weight for the whole forward."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def deepspeed_config(d: DeepSpeedConfig, rows: int, world: int, grad_accum: int, grad_clip: float,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run: ``deepspeed.config`` (a JSON/YAML file) if given, then the run's keys
    (``rows`` per rank, ``grad_accum`` micro-steps, ``grad_clip``).

    Batch sizes, accumulation and clipping always come from the run config (a file that says
    otherwise is corrected, with a note). Compute precision is the trainer's autocast
    (``train.dtype``) over float32 master weights, as for the other engines, so DeepSpeed's own
    fp16/bf16 modes stay off.
    """
    base: dict[str, Any] = {}
    if d.config:
        path = Path(d.config)
        try:
            base = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"deepspeed.config: cannot read {path}: {exc}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"deepspeed.config: {path} does not hold a mapping")
    zero = dict(base.get("zero_optimization") or {})
    if zero.get("stage", d.zero_stage) != d.zero_stage:
        print(f"note: deepspeed.config {d.config}: zero_optimization.stage={zero['stage']} replaced by "
              f"deepspeed.zero_stage={d.zero_stage} from the run config", file=sys.stderr)
    zero["stage"] = d.zero_stage
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        base.setdefault("zero_force_ds_cpu_optimizer", False)  # the run's torch AdamW steps the offloaded state
    if d.offload_params:
        if zero["stage"] != 3:
            raise ConfigError(f"deepspeed.offload_params: parameter offload needs ZeRO stage 3, not {zero['stage']}")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ours = {
        "train_micro_batch_size_per_gpu": rows,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": rows * world * grad_accum,
        "gradient_clipping": grad_clip if zero["stage"] > 0 else 0.0,  # stage 0: the trainer clips
    }
    for key, value in ours.items():
        if key in base and base[key] != value:
            print(f"note: deepspeed.config {d.config}: {key}={base[key]} replaced by {value} from the run config",
                  file=sys.stderr)
    for key in ("fp16", "bf16"):
        if (base.get(key) or {}).get("enabled"):
            raise ConfigError(f"deepspeed.config: {key}.enabled: compute precision is train.dtype "
                              f"(autocast over float32 weights); remove {key} from {d.config}")
    config = {**base, **ours, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "steps_per_print": base.get("steps_per_print", 1 << 30)}
    if load_universal:
        config["checkpoint"] = {**(base.get("checkpoint") or {}), "load_universal": True}
    return config


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of checkpoint ``source``'s ``deepspeed/`` into ``target/deepspeed``."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source / DS_TAG),
           "--output_folder", str(target / DS_TAG), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckpointError(f"converting {source / DS_TAG} to a universal checkpoint failed "
                              f"({' '.join(cmd)}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
