"""Training throughput of each arch in one process: tokens/s and MFU of the full optimizer step.

Each step runs forward and backward over ``rows`` windows of ``seq_len`` random tokens with the
recurrent state carried from the previous step (as the trainer does), clips the gradient and
steps AdamW. Warm-up steps are not timed. MFU = tokens/s x ``flops_per_token(seq_len)`` / peak.

    python benchmarks/bench_train.py --size debug --seq-len 256 --rows 8 --peak-tflops 0.2
    python benchmarks/bench_train.py --archs zarvan transformer --size 125m --seq-len 4096 --rows 1 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from pretrain.train import build_optimizer
from zarvan_dist.models import ARCHS, ModelConfig, build_model
from zarvan_dist.training.config import RunConfig
from zarvan_dist.training.engines import resolve_device, resolve_dtype
from zarvan_dist.training.evaluate import next_token_loss
from zarvan_dist.training.metrics import memory_gib, peak_tflops

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: int, seq_len: int, steps: int,
                 device: torch.device, autocast: contextlib.AbstractContextManager) -> list[float]:
    """Seconds of each of ``steps`` training steps (forward, backward, clipping, optimizer step) over
    ``rows`` windows of ``seq_len`` random tokens, the state carried where the model has one."""
    stateful = hasattr(model, "init_state")
    state = model.init_state(rows, device) if stateful else None
    times = []
    for _ in range(steps):
        ids = torch.randint(4, model.config.vocab_size, (rows, seq_len + 1), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            if stateful:
                out = model(ids[:, :-1], state)
                logits, state = out.logits, out.state.detach()
            else:
                logits = model(ids[:, :-1])
        loss = next_token_loss(logits, ids[:, 1:])
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench(arch: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step and the derived figures of one arch."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = ModelConfig.from_yaml(CONFIGS / f"{arch}-{args.size}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    run = RunConfig.from_dict({"run_dir": "unused", "model": cfg.to_dict()})
    optimizer = build_optimizer(model, run)
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.autocast(device.type, dtype=dtype))
    times = step_seconds(model, optimizer, args.rows, args.seq_len, args.warmup + args.steps, device,
                         autocast)[args.warmup:]
    seconds = sorted(times)[len(times) // 2]
    tokens_per_s = args.rows * args.seq_len / seconds
    peak = peak_tflops(args.peak_tflops, device)
    flops = model.flops_per_token(args.seq_len)
    return {"params_m": model.num_params() / 1e6, "step_s": seconds, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops / (peak * 1e12) if peak else float("nan"),
            "memory_gib": memory_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS, help="archs (default: all)")
    parser.add_argument("--size", default="debug", help="named size in configs/models (default: debug)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    parser.add_argument("--rows", type=int, default=8, help="rows per step (default: 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="autocast dtype (default: auto, bfloat16 on GPUs that support it)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of the device for MFU (default: known GPUs only)")
    args = parser.parse_args()
    print(f"size {args.size}, {args.rows} x {args.seq_len} tokens per step, device {resolve_device(args.device)}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'arch':<12}{'params M':>10}{'step s':>9}{'tokens/s':>11}{'MFU %':>8}{'mem GiB':>9}")
    for arch in args.archs:
        r = bench(arch, args)
        print(f"{arch:<12}{r['params_m']:>10.1f}{r['step_s']:>9.3f}{r['tokens_per_s']:>11,.0f}"
              f"{100 * r['mfu']:>8.2f}{r['memory_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
