"""Training throughput of each engine: tokens/s, MFU and peak memory of the full optimizer step.

For every engine the script starts one job (``torchrun --standalone --nproc_per_node N`` for the
distributed ones, one process for ``single``) that wraps the same model with
``zarvan_dist.training.engines.build_engine`` and runs the trainer's step: forward and backward of
``rows / N`` windows of random tokens per rank with the recurrent state carried, the engine's
gradient reduction, clipping and AdamW. Warm-up steps are not timed; the median step is reported.
tokens/s counts every rank's tokens; MFU = tokens/s x flops_per_token / (peak x N).

    python benchmarks/bench_engines.py --nproc 2 --size debug --seq-len 256 --rows 8 --peak-tflops 0.2
    python benchmarks/bench_engines.py --nproc 1 --arch zarvan --size 125m --seq-len 4096 --rows 1   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pretrain.train import build_optimizer  # noqa: E402
from zarvan_dist.models import ModelConfig, build_model  # noqa: E402
from zarvan_dist.training.config import RunConfig  # noqa: E402
from zarvan_dist.training.engines import (  # noqa: E402
    Collective,
    build_engine,
    init_distributed,
    resolve_device,
    resolve_dtype,
)
from zarvan_dist.training.evaluate import next_token_loss  # noqa: E402
from zarvan_dist.training.metrics import memory_gib, peak_tflops  # noqa: E402

ENGINES = {
    "single": {"engine": "single"},
    "ddp": {"engine": "ddp"},
    "fsdp": {"engine": "fsdp"},
    "zero1": {"engine": "deepspeed", "deepspeed": {"zero_stage": 1}},
    "zero2": {"engine": "deepspeed", "deepspeed": {"zero_stage": 2}},
    "zero3": {"engine": "deepspeed", "deepspeed": {"zero_stage": 3}},
}


def worker(args: argparse.Namespace) -> None:
    """One rank of one engine's job; rank 0 prints a JSON line of the figures."""
    model_cfg = ModelConfig.from_yaml(ROOT / "configs" / "models" / f"{args.arch}-{args.size}.yaml")
    cfg = RunConfig.from_dict({"run_dir": "unused", "model": model_cfg.to_dict(), **ENGINES[args.engine],
                               "data": {"rows": args.rows}, "train": {"dtype": args.dtype, "device": args.device,
                                                                      "activation_checkpointing": args.ac}})
    env, device = init_distributed(cfg.engine, resolve_device(args.device))
    comm = Collective(env, device)
    dtype = resolve_dtype(args.dtype, device)
    if args.rows % env.world:
        raise SystemExit(f"--rows {args.rows} does not divide among {env.world} ranks")
    rows = args.rows // env.world
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    flops = model.flops_per_token(args.seq_len)
    params = model.num_params()
    if args.ac:
        from pretrain.train import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    engine = build_engine(model, lambda m: build_optimizer(m, cfg), cfg, env, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(
        device.type, enabled=False)
    state = engine.module.init_state(rows, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(4, model_cfg.vocab_size, (rows, args.seq_len + 1), device=device)
        comm.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.zero_grad()
        with autocast:
            out = engine.forward(ids[:, :-1], state)
        loss = next_token_loss(out.logits, ids[:, 1:])
        engine.backward(loss, last=True)
        engine.step(3e-4, 1.0, True)
        state = out.state.detach()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = comm.max(time.perf_counter() - start)
        if step >= args.warmup:
            times.append(seconds)
    seconds = sorted(times)[len(times) // 2]
    tokens_per_s = args.rows * args.seq_len / seconds
    peak = peak_tflops(args.peak_tflops, device)
    result = {"engine": args.engine, "world": env.world, "device": str(device), "params_m": params / 1e6,
              "step_s": seconds, "tokens_per_s": tokens_per_s,
              "mfu": tokens_per_s * flops / (peak * 1e12 * env.world) if peak else None,
              "memory_gib": comm.max(memory_gib(device))}
    if env.main:
        print("RESULT " + json.dumps(result), flush=True)


def launch(engine: str, args: argparse.Namespace, passthrough: list[str]) -> dict | None:
    nproc = 1 if engine == "single" else args.nproc
    script = [str(Path(__file__).resolve()), "--worker", "--engine", engine, *passthrough]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                             if nproc > 1 else []), *script]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"{engine}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES),
                        help="engines to measure (default: all)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the distributed engines (default: 2)")
    parser.add_argument("--arch", default="zarvan", help="model arch (default: zarvan)")
    parser.add_argument("--size", default="debug", help="named size in configs/models (default: debug)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    parser.add_argument("--rows", type=int, default=8, help="rows of the global batch (default: 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="autocast dtype (default: auto, bfloat16 on GPUs that support it)")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing of every block")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of one device for MFU (default: known GPUs only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="single", choices=list(ENGINES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    passthrough = ["--arch", args.arch, "--size", args.size, "--seq-len", str(args.seq_len), "--rows", str(args.rows),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                   "--dtype", args.dtype] + (["--ac"] if args.ac else []) + \
        (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
    print(f"{args.arch} {args.size}, {args.rows} x {args.seq_len} tokens per step, distributed engines on "
          f"{args.nproc} processes, device {resolve_device(args.device)}")
    print(f"{'engine':<8}{'ranks':>6}{'params M':>10}{'step s':>9}{'tokens/s':>11}{'MFU %':>8}{'mem GiB':>9}")
    for engine in args.engines:
        r = launch(engine, args, passthrough)
        if r is None:
            continue
        mfu = f"{100 * r['mfu']:>8.2f}" if r["mfu"] is not None else f"{'-':>8}"
        print(f"{engine:<8}{r['world']:>6}{r['params_m']:>10.1f}{r['step_s']:>9.3f}{r['tokens_per_s']:>11,.0f}"
              f"{mfu}{r['memory_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
