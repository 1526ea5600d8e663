"""Monitoring: ``RUN/metrics.jsonl``, TensorBoard scalars, the console line, and model probes.

Every record goes to ``metrics.jsonl`` (one JSON object per line, with ``step``) and, when
enabled, to TensorBoard under the same names. A resumed run first drops the records and events
past the step it resumes from, so the files read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zarvan_dist.models.state import RecurrentState

EXPERTS = ("holistic", "associative", "sequential")

# Dense bfloat16 peak TFLOP/s of one device, by a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """The peak for MFU: the configured one, else the table's for a known GPU, else None."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory: allocated GPU memory on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


class ExpertProbe:
    """Mean weight of each Zarvan expert per layer, from hooks on the blocks' ``expert_gate``.

    Collects only while ``active``; ``pop()`` returns ``{"experts/layer_i/holistic": w, ...}``
    averaged over the tokens seen since the last pop. Empty for models without expert gates.
    """

    def __init__(self, model: nn.Module) -> None:
        self.active = False
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        for name, module in model.named_modules():
            if name.endswith("expert_gate"):
                layer = name.split(".")[-2]
                # kept out of torch.compile: traced, its per-layer key and flag would force a recompile per block
                module.register_forward_hook(torch.compiler.disable(self._hook(f"experts/layer_{layer}")))

    def _hook(self, key: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self.active:
                w = output.detach().float().flatten(0, -2).sum(0)
                self._sums[key] = self._sums.get(key, 0) + w
                self._counts[key] = self._counts.get(key, 0) + output.shape[:-1].numel()
        return hook

    def pop(self) -> dict[str, float]:
        out = {}
        for key, total in self._sums.items():
            mean = (total / self._counts[key]).tolist()
            out.update({f"{key}/{expert}": v for expert, v in zip(EXPERTS, mean)})
        self._sums, self._counts = {}, {}
        return out


def state_norms(state: RecurrentState) -> dict[str, float]:
    """Per-layer norm of the carried state: sqrt of the row-mean of its floating tensors' squared norms.

    Entries at the empty-prefix sentinel (running maxima of a prefix softmax, -1e30) count as 0.
    """
    sums: dict[str, float] = {}
    for name, t in state.items():
        if not t.is_floating_point() or not name.startswith("layers."):
            continue
        layer = name.split(".")[1]
        v = t.detach().float()
        v = torch.where(v.abs() < 1e29, v, torch.zeros_like(v))
        sums[layer] = sums.get(layer, 0.0) + float(v.pow(2).flatten(1).sum(1).mean())
    return {f"state_norm/layer_{k}": math.sqrt(v) for k, v in sorted(sums.items(), key=lambda kv: int(kv[0]))}


class MetricsLogger:
    """Records to ``RUN/metrics.jsonl`` and TensorBoard; ``resume_from(step)`` truncates both past it."""

    def __init__(self, run_dir: str | Path, tensorboard: bool, resume_step: int | None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a killed run wrote past the checkpoint (all of them on a fresh start)
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                        purge_step=0 if resume_step is None else resume_step + 1)
        self._file = self.path.open("a")

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, record: dict[str, float], tensorboard: bool = True) -> None:
        """One JSON line ``{"step": step, **record}`` (non-finite numbers as null); scalars to TensorBoard."""
        line = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps({"step": step, **line}, allow_nan=False) + "\n")
        self._file.flush()
        if self.writer is not None and tensorboard:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self._file.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


class Progress:
    """The console line: step, loss, learning rate, throughput and ETA."""

    def __init__(self, total_steps: int, start_step: int) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.start = time.perf_counter()

    def line(self, step: int, record: dict[str, float]) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.2f}%")
        if "skipped_steps" in record and record["skipped_steps"]:
            parts.append(f"skipped {record['skipped_steps']}")
        parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
