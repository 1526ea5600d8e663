"""Generation speed and memory at long context: ms per new token from a carried state, per arch.

For each arch and context length the script builds the state of a context of random tokens by
prefill in chunks of --chunk tokens with the state carried (eval mode, inference mode, so the
prefill's memory is that of one chunk), then times --new-tokens greedy one-token decoding steps
from that state, ``model(next_token, state)``, the step ``zarvan_dist.generation.generate`` takes.
Every repeat starts again from the prefilled state (the models never write their state in place),
after --warmup untimed steps. All contexts of an arch are prefilled first and the repeats then go
round them in turn, so a change of the machine's load falls on every context alike. Reported per
arch and context:

    prefill s   seconds of the chunked prefill (once, not the figure of merit)
    ms/token    median over --repeats of (seconds of --new-tokens steps) / --new-tokens
    tokens/s    --batch x --new-tokens / those seconds
    state MiB   bytes of the state's tensors after the prefill (all it carries of the past)
    peak MiB    peak memory while decoding --new-tokens tokens (one more, untimed run) above the
                memory held when it began (weights, the prefilled state): the steps' activations,
                logits and new states, the previous step's beside the next. CUDA:
                torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
                memory_allocated. CPU: the peak bytes of the tensors the decoding creates that are
                alive at once (``TensorPeak``, a dispatch mode); tracemalloc does not see torch's
                memory, and the resident set reads no increase (glibc reuses what the prefill freed).

and, per arch, the ratio of each figure at the longest context to the shortest. The linear
models (zarvan, nonattn) carry a fixed-size state, so their ratios should be near 1. The
transformer baseline runs twice (--attention both): "transformer full" with a window longer than
the context, i.e. full causal attention whose KV cache spans the whole context, so its cost per
token grows with the context (it is skipped, with the reason, at a context whose KV cache and
prefill attention scores would not fit in the free memory); and "transformer wN" with its
configured sliding window of N keys, whose state is a KV cache of the last N - 1 tokens per layer
(``zarvan_dist.ops.attention.windowed_attention``), fixed in size beyond the window. Archs that do
not carry a state (slam: ``streams`` false, every token re-reads the context) are skipped with the
reason.

Random weights (seed 0) and random tokens: the figures are costs, not quality. Timings on a
shared machine vary with its load; the header prints the load average. On a CPU that other jobs
share, OMP_NUM_THREADS=1 avoids torch's threads waiting on each other (small models decode
several times faster that way).

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py    # debug size, 1k/8k/64k: ~1-2 min on a CPU core
    python benchmarks/bench_generate.py --contexts 1024 8192 --new-tokens 16 --repeats 3    # quick: ~15 s
    python benchmarks/bench_generate.py --size 125m --device cuda --attention full
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zarvan_dist.models import ARCHS, ModelConfig, RecurrentState, build_model  # noqa: E402
from zarvan_dist.training.engines import resolve_device, resolve_dtype  # noqa: E402

CONFIGS = ROOT / "configs" / "models"
ATTENTION_ARCHS = ("transformer", "zephyra")
"""Archs whose state is a KV cache of attn_window - 1 tokens (``TransformerLM``)."""
MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensors created while the mode is on that are alive at the same time.

    The CPU stand-in for ``torch.cuda.max_memory_allocated`` above a baseline: the tensors that
    existed before (the weights, the prefilled state) are not counted, nor the scratch memory
    inside an op. Storages are counted once (views share them) and stop counting when their last
    tensor dies. The process's resident set cannot serve: glibc keeps the memory the prefill freed
    and hands it to the decoding steps, which then read as no increase.
    """

    def __init__(self) -> None:
        super().__init__()
        self.before: dict[int, StorageWeakRef] = {}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    self.before.setdefault(ref.cdata, ref)  # held by the weak ref: the id is not reused
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.before:
                    self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def free_memory(device: torch.device) -> float:
    """Bytes that can still be allocated: free GPU memory, or MemAvailable on the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024.0


def state_bytes(state: RecurrentState) -> int:
    """Bytes of all the state's tensors."""
    return sum(t.numel() * t.element_size() for _, t in state.items())


def attention_bytes(cfg: ModelConfig, batch: int, chunk: int) -> float:
    """Rough memory of an attention model's prefill: KV caches of every layer, and one chunk's
    scores with the softmax, mask and blocked keys beside them (float32), counted four times."""
    head_dim = cfg.d_model // cfg.n_heads
    cache = 2 * cfg.n_layers * batch * cfg.n_heads * (cfg.attn_window - 1) * head_dim * 4
    keys = cfg.attn_window - 1 + chunk
    return cache + 4.0 * batch * cfg.n_heads * chunk * keys * 4


def model_config(arch: str, context: int, full: bool, args: argparse.Namespace) -> ModelConfig:
    """The named size of ``arch``; with ``full`` an attention arch sees the whole context."""
    cfg = ModelConfig.from_yaml(CONFIGS / f"{arch}-{args.size}.yaml")
    if full and arch in ATTENTION_ARCHS:
        # every token of the context and of the decoded ones stays in the cache
        window = context + args.warmup + args.new_tokens + 1
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "attn_window": window})
    return cfg


def decode(model: torch.nn.Module, token: torch.Tensor, state: RecurrentState, steps: int) -> torch.Tensor:
    """``steps`` greedy one-token steps from ``token`` [B, 1] and ``state``; returns the last token."""
    for _ in range(steps):
        out = model(token, state)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        state = out.state
    return token


def decoding_peak(model: torch.nn.Module, token: torch.Tensor, state: RecurrentState, steps: int,
                  device: torch.device) -> int:
    """Peak bytes above those held at the start while decoding ``steps`` tokens (untimed)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        decode(model, token, state, steps)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    with TensorPeak() as mode:
        decode(model, token, state, steps)
    return mode.peak


class Context(NamedTuple):
    """A prefilled context: the model, the token after it [B, 1], its state and the prefill's seconds."""

    model: torch.nn.Module
    token: torch.Tensor
    state: RecurrentState
    prefill_s: float


def skip_reason(model: torch.nn.Module, context: int, full: bool, args: argparse.Namespace,
                device: torch.device) -> str | None:
    """Why ``model`` is not measured at ``context``, or None."""
    cfg = model.config
    if not model.streams:
        return f"{cfg.arch} carries no state (streams false): each new token re-reads the whole context"
    if full and cfg.arch in ATTENTION_ARCHS:
        need, free = attention_bytes(cfg, args.batch, args.chunk), free_memory(device)
        if need > free:
            return (f"full attention at context {context}: the KV cache and prefill scores need about "
                    f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    return None


def prefill(model: torch.nn.Module, context: int, args: argparse.Namespace, device: torch.device,
            autocast: contextlib.AbstractContextManager) -> Context:
    """The state after ``context`` random tokens fed --chunk at a time, and --warmup steps from it."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (args.batch, context), generator=generator).to(device)
    with torch.inference_mode(), autocast:
        state = model.init_state(args.batch, device)
        synchronize(device)
        start = time.perf_counter()
        for lo in range(0, context, args.chunk):
            out = model(ids[:, lo:lo + args.chunk], state)
            state = out.state
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        seconds = time.perf_counter() - start
        decode(model, token, state, args.warmup)
    return Context(model, token, state, seconds)


def bench(arch: str, full: bool, contexts: list[int], args: argparse.Namespace, device: torch.device,
          dtype: torch.dtype) -> dict[int, dict[str, float] | str]:
    """The figures of one arch at each context length, or the reason it was skipped there.

    All contexts are prefilled first and the timed repeats then go round the contexts in turn, so
    a change of the machine's load over the run falls on every context alike.
    """
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.autocast(device.type, dtype=dtype))
    models: dict[int, torch.nn.Module] = {}  # by attn_window, the one field model_config changes
    prepared: dict[int, Context | str] = {}
    for c in contexts:
        cfg = model_config(arch, c, full, args)
        if cfg.attn_window not in models:
            torch.manual_seed(0)
            models[cfg.attn_window] = build_model(cfg).to(device).eval()
        reason = skip_reason(models[cfg.attn_window], c, full, args, device)
        prepared[c] = reason or prefill(models[cfg.attn_window], c, args, device, autocast)
    ready = {c: p for c, p in prepared.items() if isinstance(p, Context)}
    times: dict[int, list[float]] = {c: [] for c in ready}
    with torch.inference_mode(), autocast:
        for _ in range(args.repeats):
            for c, p in ready.items():
                synchronize(device)
                start = time.perf_counter()
                decode(p.model, p.token, p.state, args.new_tokens)
                synchronize(device)
                times[c].append(time.perf_counter() - start)
        peaks = {c: decoding_peak(p.model, p.token, p.state, args.new_tokens, device) for c, p in ready.items()}
    results: dict[int, dict[str, float] | str] = {}
    for c, p in prepared.items():
        if not isinstance(p, Context):
            results[c] = p
            continue
        seconds = sorted(times[c])[len(times[c]) // 2]
        results[c] = {"params_m": p.model.num_params() / 1e6, "prefill_s": p.prefill_s,
                      "ms_per_token": 1e3 * seconds / args.new_tokens,
                      "tokens_per_s": args.batch * args.new_tokens / seconds,
                      "state_mib": state_bytes(p.state) / MIB, "peak_mib": peaks[c] / MIB}
    return results


def plot(results: dict[str, dict[int, dict[str, float]]], path: Path, title: str) -> None:
    """ms/token and decoding memory (state + peak) against context, one line per arch, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    contexts = sorted({c for rows in results.values() for c in rows})
    for arch, rows in results.items():
        xs = sorted(rows)
        ax_time.plot(xs, [rows[c]["ms_per_token"] for c in xs], marker="o", label=arch)
        ax_mem.plot(xs, [rows[c]["state_mib"] + rows[c]["peak_mib"] for c in xs], marker="o", label=arch)
    for ax, label in ((ax_time, "ms per new token"), (ax_mem, "state + decoding peak, MiB")):
        ax.set_xscale("log")
        ax.set_xticks(contexts, [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def variants(args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    """(arch, full attention, label) of every row group: an attention arch once per --attention mode."""
    out = []
    for arch in args.archs:
        if arch not in ATTENTION_ARCHS:
            out.append((arch, False, arch))
            continue
        window = ModelConfig.from_yaml(CONFIGS / f"{arch}-{args.size}.yaml").attn_window
        if args.attention in ("window", "both"):
            out.append((arch, False, f"{arch} w{window}"))
        if args.attention in ("full", "both"):
            out.append((arch, True, f"{arch} full"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["zarvan", "nonattn", "transformer"], choices=ARCHS,
                        help="archs (default: zarvan nonattn transformer)")
    parser.add_argument("--size", default="debug", help="named size in configs/models (default: debug)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 65536],
                        help="context lengths in tokens (default: 1024 8192 65536)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoding steps per repeat (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed decoding steps first (default: 8)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per prefill forward (default: 1024)")
    parser.add_argument("--attention", choices=["both", "full", "window"], default="both",
                        help="attention archs: with a window longer than the context (full causal attention, a KV "
                             "cache of the whole context), with their configured attn_window, or both (default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="autocast dtype (default: auto, bfloat16 on GPUs that support it)")
    parser.add_argument("--plot", type=Path, default=ROOT / ".cache" / "bench_generate.png",
                        help="PNG of ms/token and memory against context (default: .cache/bench_generate.png)")
    args = parser.parse_args()
    for name in ("new_tokens", "repeats", "batch", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or min(args.contexts) < 1:
        parser.error("--warmup must be >= 0 and every context >= 1")
    contexts = sorted(set(args.contexts))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"size {args.size}, batch {args.batch}, {args.new_tokens} new tokens x {args.repeats} repeats "
          f"({args.warmup} warm-up), prefill chunk {args.chunk}, device {device}, dtype {str(dtype)[6:]}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    width = 18
    print(f"{'arch':<{width}}{'context':>9}{'params M':>10}{'prefill s':>11}{'ms/token':>10}{'tokens/s':>10}"
          f"{'state MiB':>11}{'peak MiB':>10}")
    results: dict[str, dict[int, dict[str, float]]] = {}
    for arch, full, label in variants(args):
        results[label] = {}
        for context, r in bench(arch, full, contexts, args, device, dtype).items():
            if isinstance(r, str):
                print(f"{label:<{width}}{context:>9}  skipped: {r}", flush=True)
                continue
            results[label][context] = r
            print(f"{label:<{width}}{context:>9}{r['params_m']:>10.2f}{r['prefill_s']:>11.2f}"
                  f"{r['ms_per_token']:>10.3f}{r['tokens_per_s']:>10,.0f}{r['state_mib']:>11.4g}"
                  f"{r['peak_mib']:>10.4g}", flush=True)
        gc.collect()
    print()
    for label, rows in results.items():
        if len(rows) < 2:
            continue
        lo, hi = rows[min(rows)], rows[max(rows)]
        ratios = ", ".join(f"{name} x{hi[key] / lo[key]:.3f}" for name, key in (
            ("ms/token", "ms_per_token"), ("tokens/s", "tokens_per_s"), ("state", "state_mib"), ("peak", "peak_mib")))
        print(f"{label:<{width}}context {max(rows)} / {min(rows)}: {ratios}")
    if not any(results.values()):
        return
    try:
        plot(results, args.plot, f"generation from a carried state: {args.size}, batch {args.batch}, {device.type}")
    except ImportError:
        print("plot: skipped, matplotlib is not installed (pip install -e '.[bench]')")
        return
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
