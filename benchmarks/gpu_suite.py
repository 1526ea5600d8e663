"""One-shot GPU benchmark suite: training step, ops and decoding, in one report (torch only).

On a bare GPU machine with torch and this repository (no deepspeed, webdataset or faiss needed)::

    bash benchmarks/gpu_suite.sh                  # = python benchmarks/gpu_suite.py --out gpu_suite
    python benchmarks/gpu_suite.py --smoke        # tiny sizes on the CPU: checks the suite, not speed

It measures, in this order, and writes ``OUT/gpu_suite.md`` (tables), ``OUT/gpu_suite.json`` and
``OUT/gpu_suite.png`` after every item, so a stopped run leaves what it measured:

1. ops: forward + backward of the fast ops against the naive references (``bench_ops.py``) at
   [1, 4096, 768] and [8, 1024, 768] (eager, and the fast forms compiled).
2. training step, eager: tokens/s, MFU and peak memory of forward + backward + AdamW over
   --tokens tokens per step (rows = tokens // context, at least 1), bf16 autocast, the state
   carried, for zarvan, nonattn and transformer at --size and each --contexts, and for
   ``sdpa-gpt``: a plain GPT of the transformer's size with full causal
   ``scaled_dot_product_attention(is_causal=True)`` (FlashAttention on an H100), no state — the
   bar the linear models are measured against.
3. decoding: ms per new token from a carried state at the first and last context
   (``bench_generate.py``'s prefill and decode).
4. training step, compiled (each block compiled, as ``train.compile: true`` does), at the first
   and last context first, then the others.

MFU = tokens/s x ``flops_per_token(context)`` / the GPU's bf16 dense peak (``GPU_PEAK_TFLOPS``).
The suite keeps to --budget-s seconds (default 420, so it ends within 8 minutes with start-up):
an item that would start after it is skipped and listed as such; one that runs out of memory is
reported as OOM. Each training figure is the median of --steps timed steps after --warmup steps
(the first of which compiles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_generate  # noqa: E402
import bench_ops  # noqa: E402
import bench_train  # noqa: E402
from pretrain.train import apply_compile  # noqa: E402
from zarvan_dist.models import ModelConfig, build_model  # noqa: E402
from zarvan_dist.training.metrics import peak_tflops  # noqa: E402

CONFIGS = ROOT / "configs" / "models"
ARCHS = ("zarvan", "nonattn", "transformer", "sdpa-gpt")


class SDPABlock(nn.Module):
    """Pre-norm GPT block with full causal attention through scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(batch, length, width))
        return x + self.ffn(self.norm2(x))


class SDPAGPT(nn.Module):
    """The transformer config's size as a plain full-attention GPT (learned positions, no state)."""

    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.config = cfg
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(max_len, cfg.d_model)
        self.blocks = nn.ModuleList(SDPABlock(cfg.d_model, cfg.n_heads, d_ff) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def flops_per_token(self, seq_len: int) -> float:
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and "embed" not in n
                     and not n.startswith("pos"))
        return 6 * matmul + 12 * self.config.n_layers * self.config.d_model * seq_len


def build(arch: str, size: str, context: int, device: torch.device) -> nn.Module:
    if arch == "sdpa-gpt":
        return SDPAGPT(ModelConfig.from_yaml(CONFIGS / f"transformer-{size}.yaml"), context).to(device)
    return build_model(ModelConfig.from_yaml(CONFIGS / f"{arch}-{size}.yaml")).to(device)


def train_step(arch: str, context: int, compiled: bool, args: argparse.Namespace,
               device: torch.device) -> dict[str, object]:
    """Median seconds of one training step and the figures derived from it."""
    rows = max(1, args.tokens // context)
    torch.manual_seed(0)
    model = build(arch, args.size, context, device).train()
    if compiled:
        torch._dynamo.reset()
        apply_compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    every = bench_train.step_seconds(model, optimizer, rows, context, args.warmup + args.steps, device,
                                     torch.autocast(device.type, dtype=torch.bfloat16))
    first, times = every[0], every[args.warmup:]
    seconds = sorted(times)[len(times) // 2]
    tokens_per_s = rows * context / seconds
    peak = peak_tflops(None, device)
    mfu = tokens_per_s * model.flops_per_token(context) / (peak * 1e12) if peak else float("nan")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"arch": arch, "context": context, "mode": "compiled" if compiled else "eager", "rows": rows,
            "tokens_per_step": rows * context, "step_s": seconds, "first_step_s": first,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_gib": memory,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def decode_ms(arch: str, contexts: list[int], args: argparse.Namespace, device: torch.device) -> dict[int, object]:
    """ms per new token from a carried state (full attention for the transformer: its KV cache spans the context)."""
    options = argparse.Namespace(size=args.size, batch=1, chunk=min(2048, max(contexts)), new_tokens=args.new_tokens,
                                 warmup=2, repeats=3)
    full = arch == "transformer"
    results = bench_generate.bench(arch, full, contexts, options, device, torch.bfloat16)
    return {c: r if isinstance(r, str) else r["ms_per_token"] for c, r in results.items()}


class Report:
    """Everything measured so far, written to OUT after every item."""

    def __init__(self, out: Path, header: dict[str, object]) -> None:
        self.out = out
        self.data: dict[str, object] = {"header": header, "ops": [], "train": [], "decode": {}, "skipped": []}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, value: object) -> None:
        if isinstance(self.data[key], list):
            self.data[key].append(value)  # type: ignore[union-attr]
        else:
            self.data[key].update(value)  # type: ignore[union-attr]
        self.write()

    def train_rows(self) -> list[dict[str, object]]:
        return [r for r in self.data["train"] if "tokens_per_s" in r]  # type: ignore[union-attr]

    def ratios(self) -> list[str]:
        """zarvan against sdpa-gpt per context and mode, and zarvan's last context against its first."""
        best = {(r["arch"], r["context"], r["mode"]): r["tokens_per_s"] for r in self.train_rows()}
        lines = []
        contexts = sorted({c for _, c, _ in best})
        for mode in ("eager", "compiled"):
            for c in contexts:
                if ("zarvan", c, mode) in best and ("sdpa-gpt", c, mode) in best:
                    lines.append(f"- {mode}, context {c}: zarvan / sdpa-gpt tokens/s = "
                                 f"{best['zarvan', c, mode] / best['sdpa-gpt', c, mode]:.2f}")
            if len(contexts) > 1 and ("zarvan", contexts[0], mode) in best and ("zarvan", contexts[-1], mode) in best:
                lines.append(f"- {mode}: zarvan tokens/s at {contexts[-1]} / at {contexts[0]} = "
                             f"{best['zarvan', contexts[-1], mode] / best['zarvan', contexts[0], mode]:.2f}")
        return lines

    def write(self) -> None:
        (self.out / "gpu_suite.json").write_text(json.dumps(self.data, indent=1, default=str))
        head = self.data["header"]
        lines = ["# GPU suite", "", " ".join(f"{k}: {v}," for k, v in head.items()).rstrip(","), ""]  # type: ignore[union-attr]
        lines += ["## Training step (forward + backward + AdamW, bf16)", "",
                  "| arch | context | mode | rows | tokens/s | MFU % | peak GiB | step s | first step s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in self.data["train"]:  # type: ignore[union-attr]
            if "tokens_per_s" in r:
                lines.append(f"| {r['arch']} | {r['context']} | {r['mode']} | {r['rows']} | {r['tokens_per_s']:,.0f} | "
                             f"{100 * r['mfu']:.1f} | {r['peak_gib']:.1f} | {r['step_s']:.3f} | {r['first_step_s']:.1f} |")
            else:
                lines.append(f"| {r['arch']} | {r['context']} | {r['mode']} | | {r['error']} | | | | |")
        lines += ["", "Ratios:", *self.ratios(), "", "## Decoding (ms per new token, batch 1, bf16)", "",
                  "| arch | context | ms/token |", "|---|---|---|"]
        for arch, per_context in self.data["decode"].items():  # type: ignore[union-attr]
            for c, v in per_context.items():
                lines.append(f"| {arch} | {c} | {v if isinstance(v, str) else f'{v:.2f}'} |")
        lines += ["", "## Ops (forward + backward)", "",
                  "| op | shape | form | ms | calls | launches |", "|---|---|---|---|---|---|"]
        for r in self.data["ops"]:  # type: ignore[union-attr]
            lines.append(f"| {r['op']} | {r['shape']} | {r['form']} | {r['ms']:.2f} | {r['calls']} | {r['launches']} |")
        if self.data["skipped"]:
            lines += ["", "## Skipped (time budget)", "", *[f"- {s}" for s in self.data["skipped"]]]  # type: ignore[union-attr]
        (self.out / "gpu_suite.md").write_text("\n".join(lines) + "\n")
        self.plot()

    def plot(self) -> None:
        rows = self.train_rows()
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_train, ax_decode) = plt.subplots(1, 2, figsize=(11, 4.2))
        for arch in ARCHS:
            for mode, style in (("eager", "--"), ("compiled", "-")):
                points = sorted((r["context"], r["tokens_per_s"]) for r in rows if r["arch"] == arch and r["mode"] == mode)
                if points:
                    ax_train.plot(*zip(*points), style, marker="o", label=f"{arch} {mode}")
        for arch, per_context in self.data["decode"].items():  # type: ignore[union-attr]
            points = sorted((int(c), v) for c, v in per_context.items() if not isinstance(v, str))
            if points:
                ax_decode.plot(*zip(*points), marker="o", label=arch)
        for ax, label in ((ax_train, "training tokens/s"), (ax_decode, "decode ms per token")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{self.data['header'].get('device')}, size {self.data['header'].get('size')}")  # type: ignore[union-attr]
        fig.tight_layout()
        fig.savefig(self.out / "gpu_suite.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_suite"), help="report folder (default: gpu_suite)")
    parser.add_argument("--size", default="125m", help="named size in configs/models (default: 125m)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 65536],
                        help="training contexts (default: 1024 4096 16384 65536)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per training step (default: 32768)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS, help="models (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per repeat (default: 32)")
    parser.add_argument("--op-shapes", nargs="+", type=bench_ops.parse_shape, default=[(1, 4096, 768), (8, 1024, 768)],
                        help="op shapes BxTxE (default: 1x4096x768 8x1024x768)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no item after this many seconds (default: 420)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--smoke", action="store_true",
                        help="a check of the suite on any machine: debug size, contexts 64 256, 512 tokens per step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.contexts, args.tokens, args.steps, args.warmup, args.new_tokens = "debug", [64, 256], 512, 1, 1, 2
        args.op_shapes = [(1, 256, 32)]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --device cpu --smoke checks the suite without one")
    started = time.perf_counter()
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "size": args.size, "tokens per step": args.tokens,
              "peak TFLOP/s": peak_tflops(None, device)}
    report = Report(args.out, header)
    print(f"gpu suite: {header}; report in {args.out}/", flush=True)

    def in_budget(item: str) -> bool:
        if time.perf_counter() - started < args.budget_s:
            return True
        report.add("skipped", item)
        print(f"skipped (time budget): {item}", flush=True)
        return False

    for batch, length, width in args.op_shapes:
        if in_budget(f"ops [{batch},{length},{width}]"):
            for row in bench_ops.bench_shape(batch, length, width, list(bench_ops.op_cases(1)),
                                             ["naive", "fast", "compiled"], 5, device, torch.float32):
                report.add("ops", row)
    bench_ops.print_rows(report.data["ops"])  # type: ignore[arg-type]

    def train(arch: str, context: int, compiled: bool) -> None:
        item = f"train {arch} context {context} {'compiled' if compiled else 'eager'}"
        if not in_budget(item):
            return
        try:
            row = train_step(arch, context, compiled, args, device)
        except torch.OutOfMemoryError:
            row = {"arch": arch, "context": context, "mode": "compiled" if compiled else "eager", "error": "OOM"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.add("train", row)
        print(f"{item}: " + (f"{row['tokens_per_s']:,.0f} tokens/s, MFU {100 * row['mfu']:.1f} %, "
                             f"peak {row['peak_gib']:.1f} GiB" if "tokens_per_s" in row else row["error"]), flush=True)

    for context in args.contexts:
        for arch in args.archs:
            train(arch, context, compiled=False)
    ends = sorted({args.contexts[0], args.contexts[-1]})
    for arch in [a for a in args.archs if a != "sdpa-gpt"]:
        if in_budget(f"decode {arch}"):
            report.add("decode", {arch: decode_ms(arch, ends, args, device)})
    order = ends + [c for c in args.contexts if c not in ends]
    for context in order:
        for arch in args.archs:
            train(arch, context, compiled=True)
    print(f"done in {time.perf_counter() - started:.0f} s: {args.out}/gpu_suite.md", flush=True)
    print((args.out / "gpu_suite.md").read_text())


if __name__ == "__main__":
    main()
