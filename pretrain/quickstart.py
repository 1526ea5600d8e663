"""`make quickstart`: raw text to a trained model, end to end, on the embedded default corpus.

Runs, printing each command as a user would type it:
  1. ``python -m data_prep tokenizer``  a 4096-piece tokenizer on this Python's stdlib sources;
  2. ``python -m data_prep shards``     train/val shards of 256-token windows under data/quickstart;
  3. ``python -m pretrain``             configs/quickstart.yaml: a small Zarvan, checkpoints and TensorBoard
                                        under runs/quickstart;
  4. ``python -m pretrain.eval``        validation loss and perplexity of the last checkpoint;
  5. ``python -m pretrain.generate``    a short sample from the model, generated with its recurrent state carried.
With ``--retrieval``, step 2 is followed by ``python -m data_prep retrieval embed | index |
neighbours`` (64-token chunks of the train split, a FAISS index, 2 neighbours for every 64-token
chunk of every window) and step 3 trains the non-attention LLM with retrieval fusion
(configs/quickstart-retrieval.yaml, under runs/quickstart-retrieval).
Steps 1-2 (and the retrieval steps) are skipped when their outputs exist; step 3 resumes a run
that was stopped (``--fresh`` starts over). Extra ``--set key=value`` pairs go to the training run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
RETRIEVAL_CONFIG = ROOT / "configs" / "quickstart-retrieval.yaml"
TOKENIZER = "data/quickstart-tokenizer.model"
DATA = "data/quickstart"
RETRIEVAL = f"{DATA}/retrieval"
PROMPT = "def "


def run(args: list[str], capture: bool = False) -> str:
    """Run a Python module job from the repository root, echoing it; returns its stdout when captured."""
    print(f"\n$ python {shlex.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE if capture else None,
                          text=True)
    if capture:
        sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"quickstart: `python {shlex.join(args)}` failed with exit status {proc.returncode}")
    return proc.stdout or ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first and train from scratch")
    parser.add_argument("--retrieval", action="store_true",
                        help="build retrieval neighbours and train the non-attention LLM with them "
                             "(configs/quickstart-retrieval.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of configs/quickstart.yaml (repeatable)")
    parser.add_argument("--sample-tokens", type=int, default=120, help="tokens to sample at the end (default: 120)")
    args = parser.parse_args(argv)
    config = RETRIEVAL_CONFIG if args.retrieval else CONFIG
    run_dir = "runs/quickstart-retrieval" if args.retrieval else "runs/quickstart"
    start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 8)))
    workers = str(min(os.cpu_count() or 1, 4))
    if args.fresh:
        shutil.rmtree(ROOT / run_dir, ignore_errors=True)
    if not (ROOT / TOKENIZER).exists():
        run(["-m", "data_prep", "tokenizer", "--vocab-size", "4096", "--out", TOKENIZER, "--threads", workers])
    if not (ROOT / DATA / "manifest.json").exists():
        run(["-m", "data_prep", "shards", "--tokenizer", TOKENIZER, "--out", DATA, "--seq-len", "256",
             "--workers", workers, "--windows-per-shard", "2048"])
    if args.retrieval:
        if not (ROOT / RETRIEVAL / "embeddings" / "embeddings.json").exists():
            run(["-m", "data_prep", "retrieval", "embed", DATA, "--chunk-len", "64"])
        if not (ROOT / RETRIEVAL / "index" / "index.json").exists():
            run(["-m", "data_prep", "retrieval", "index", RETRIEVAL, "--config", "configs/retrieval/ivf_flat.yaml"])
        if not (ROOT / RETRIEVAL / "neighbours" / "neighbours.json").exists():
            run(["-m", "data_prep", "retrieval", "neighbours", DATA, "--chunk-len", "64", "--k", "2"])
    overrides = [x for item in args.overrides for x in ("--set", item)]
    run(["-m", "pretrain", "--config", str(config.relative_to(ROOT)), "--set", f"run_dir={run_dir}",
         "--set", f"data.dir={DATA}", *overrides])
    result = json.loads(run(["-m", "pretrain.eval", "--checkpoint", run_dir], capture=True).strip().splitlines()[-1])
    note = " (without retrieved text)" if args.retrieval else ""
    print(f"\n--- a sample{note}: {args.sample_tokens} tokens after {PROMPT!r}, temperature 0.8, top-k 40 ---")
    run(["-m", "pretrain.generate", "--checkpoint", run_dir, "--prompt", PROMPT, "--max-new-tokens",
         str(args.sample_tokens), "--temperature", "0.8", "--top-k", "40", "--seed", "0"])
    print("---")
    print(f"\nvalidation loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
          f"(step {result['step']}, {result['windows']} windows of the val split)")
    print(f"checkpoints: {run_dir}/checkpoints   metrics: {run_dir}/metrics.jsonl")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {run_dir}/tensorboard   (then open http://localhost:6006)")
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
