"""Sequence-mixing ops, forward + backward: the fast forms against the naive references.

For each op and shape [B, T, E] the script times one forward + backward (a random weighted sum of
the output as the loss) with a carried initial state and a document start about every 512
tokens, in three forms where they exist:

    naive      the pure-PyTorch reference (``zarvan_dist.ops.naive``), eager
    fast       the op the models call (``zarvan_dist.ops``), eager
    compiled   the same op under ``torch.compile(fullgraph=True)`` (the first call, which
               compiles, is not timed; its seconds are printed)

Reported per form: the median of --repeats timed calls (the forms take turns, round after round,
so a change of the machine's load falls on all alike), and ATen calls of one forward + backward
counted with torch.profiler two ways: "calls" = every aten:: event (views included), "launches" =
the aten:: events that compute (no aten:: child, not a view or an allocation) — on a GPU each is
a kernel launch and a pass over memory. Ratios are against the naive form of the same op.

    python benchmarks/bench_ops.py                              # CPU, [1,4096,768] and [8,1024,768]
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_generate import synchronize  # noqa: E402
from zarvan_dist.ops import causal_conv1d, prefix_softmax_pool, prefix_sum  # noqa: E402
from zarvan_dist.ops.naive import naive_prefix_softmax_pool, naive_prefix_sum  # noqa: E402

NOT_LAUNCHES = {
    "aten::" + name for name in (
        "as_strided", "select", "slice", "narrow", "view", "unsqueeze", "squeeze", "alias", "reshape",
        "_reshape_alias", "_unsafe_view", "view_as", "expand", "expand_as", "split", "split_with_sizes",
        "unbind", "transpose", "permute", "t", "detach", "empty", "empty_strided", "empty_like",
        "new_empty", "new_empty_strided", "resize_", "lift_fresh", "result_type", "contiguous", "to",
        "_to_copy", "zeros", "zeros_like", "ones_like", "full", "new_zeros", "new_full", "clone")
}
"""Views, allocations and wrappers: no kernel of their own (their copies/fills are counted)."""

Op = Callable[[torch.Tensor, ...], tuple]


def op_cases(width: int) -> dict[str, dict[str, object]]:
    """Per op: how to make its inputs, and its forms (naive / fast)."""
    def pool(score_dim: int):
        def inputs(batch, length, device, dtype):
            scores = torch.randn(batch, length, score_dim, device=device, dtype=dtype)
            values = torch.randn(batch, length, width, device=device, dtype=dtype)
            state = (torch.randn(batch, score_dim, device=device), torch.randn(batch, width, device=device),
                     torch.rand(batch, score_dim, device=device) + 0.5)
            return [scores, values], {"initial_state": state}
        return inputs

    def summed(batch, length, device, dtype):
        return [torch.randn(batch, length, width, device=device, dtype=dtype)], {
            "initial_state": torch.randn(batch, width, device=device)}

    def conv(kernel: int, dilation: int, depthwise: bool):
        def inputs(batch, length, device, dtype):
            x = torch.randn(batch, length, width, device=device, dtype=dtype)
            weight = torch.randn(width, 1 if depthwise else width, kernel, device=device) / kernel
            tail = torch.randn(batch, (kernel - 1) * dilation, width, device=device)
            return [x, weight], {"dilation": dilation, "initial_state": tail}
        return inputs

    return {
        "prefix_softmax_pool S=E": {"inputs": pool(width), "naive": naive_prefix_softmax_pool, "fast": prefix_softmax_pool},
        "prefix_softmax_pool S=1": {"inputs": pool(1), "naive": naive_prefix_softmax_pool, "fast": prefix_softmax_pool},
        "prefix_sum": {"inputs": summed, "naive": naive_prefix_sum, "fast": prefix_sum},
        "causal_conv1d depthwise k4": {"inputs": conv(4, 1, True), "fast": causal_conv1d},
        "causal_conv1d full k3 d4": {"inputs": conv(3, 4, False), "fast": causal_conv1d},
    }


def count_calls(step: Callable[[], None]) -> tuple[int, int]:
    """(every aten:: event, the computing ones) of one call of ``step``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    launches = sum(1 for e in aten if e.name not in NOT_LAUNCHES
                   and not any(c.name.startswith("aten::") and c.name not in NOT_LAUNCHES for c in e.cpu_children))
    return len(aten), launches


def make_step(fn: Op, args: list[torch.Tensor], kwargs: dict, reset: torch.Tensor, weight: torch.Tensor,
              autocast: contextlib.AbstractContextManager) -> Callable[[], None]:
    leaves = [a.detach().requires_grad_() for a in args]

    def step() -> None:
        with autocast:
            out, _ = fn(*leaves, reset=reset, **kwargs)
        (out.float() * weight).sum().backward()
        for leaf in leaves:
            leaf.grad = None
    return step


def bench_shape(batch: int, length: int, width: int, ops: list[str], forms: list[str], repeats: int,
                device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    """One row per (op, form): ms (median), calls, launches, compile seconds."""
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.autocast(device.type, dtype=dtype))
    rows = []
    for name, case in op_cases(width).items():
        if name not in ops:
            continue
        torch.manual_seed(0)
        args, kwargs = case["inputs"](batch, length, device, torch.float32)
        reset = torch.rand(batch, length, device=device) < 1 / 512
        weight = torch.randn(batch, length, width, device=device)
        steps: dict[str, Callable[[], None]] = {}
        compile_s = {}
        for form in forms:
            fn = case.get("naive" if form == "naive" else "fast")
            if fn is None:
                continue
            if form == "compiled":
                torch._dynamo.reset()
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
            steps[form] = make_step(fn, args, kwargs, reset, weight, autocast)
            start = time.perf_counter()
            steps[form]()  # warm-up (compiles)
            synchronize(device)
            compile_s[form] = time.perf_counter() - start
        times: dict[str, list[float]] = {form: [] for form in steps}
        for _ in range(repeats):
            for form, step in steps.items():
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
                times[form].append(time.perf_counter() - start)
        for form, step in steps.items():
            calls, launches = count_calls(step)
            rows.append({"op": name, "shape": f"[{batch},{length},{width}]", "form": form,
                         "ms": 1e3 * sorted(times[form])[len(times[form]) // 2], "calls": calls,
                         "launches": launches, "first_s": compile_s[form]})
    return rows


def print_rows(rows: list[dict[str, object]]) -> None:
    base = {(r["op"], r["shape"]): r for r in rows if r["form"] == "naive"}
    print(f"{'op':<28}{'shape':<16}{'form':<10}{'ms':>9}{'x naive':>9}{'calls':>7}{'x fewer':>9}"
          f"{'launches':>10}{'x fewer':>9}{'first s':>9}")
    for r in rows:
        ref = base.get((r["op"], r["shape"]))
        speed = f"{ref['ms'] / r['ms']:.2f}" if ref else "-"
        fewer = f"{ref['calls'] / r['calls']:.1f}" if ref else "-"
        fewer_l = f"{ref['launches'] / r['launches']:.1f}" if ref else "-"
        print(f"{r['op']:<28}{r['shape']:<16}{r['form']:<10}{r['ms']:>9.2f}{speed:>9}{r['calls']:>7}{fewer:>9}"
              f"{r['launches']:>10}{fewer_l:>9}{r['first_s']:>9.1f}", flush=True)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BxTxE, e.g. 1x4096x768")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 4096, 768), (8, 1024, 768)],
                        help="BxTxE shapes (default: 1x4096x768 8x1024x768)")
    parser.add_argument("--ops", nargs="+", default=list(op_cases(1)), choices=list(op_cases(1)), metavar="OP",
                        help=f"ops (default: all of {list(op_cases(1))})")
    parser.add_argument("--forms", nargs="+", default=["naive", "fast", "compiled"],
                        choices=["naive", "fast", "compiled"], help="forms (default: all three)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per form; the median is reported (default: 7)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="autocast dtype of the inputs' ops (default: float32)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, autocast {args.dtype}")
    rows = []
    for batch, length, width in args.shapes:
        rows += bench_shape(batch, length, width, args.ops, args.forms, args.repeats, device, dtype)
    print_rows(rows)
    return rows


if __name__ == "__main__":
    main()
