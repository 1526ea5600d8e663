"""`make quickstart`: raw text to a trained model, end to end, on the embedded default corpus.

Runs, printing each command as a user would type it:
  1. ``python -m data_prep tokenizer``  a 4096-piece tokenizer on this Python's stdlib sources;
  2. ``python -m data_prep shards``     train/val shards of 256-token windows under data/quickstart;
  3. ``python -m pretrain``             configs/quickstart.yaml: a small Zarvan, checkpoints and TensorBoard
                                        under runs/quickstart;
  4. ``python -m pretrain.eval``        validation loss and perplexity of the last checkpoint;
  5. a short sample decoded from the model, generated with its recurrent state carried.
Steps 1-2 are skipped when their outputs exist; step 3 resumes a run that was stopped
(``--fresh`` starts over). Extra ``--set key=value`` pairs go to the training run.
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

import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
TOKENIZER = "data/quickstart-tokenizer.model"
DATA = "data/quickstart"
RUN = "runs/quickstart"
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


def sample(run_dir: Path, prompt: str, tokens: int, seed: int = 0) -> str:
    """``tokens`` tokens sampled (temperature 0.8, top-k 40) after ``prompt`` from the run's last checkpoint."""
    from zarvan_dist.data import Manifest
    from zarvan_dist.generation import generate
    from zarvan_dist.training.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(run_dir)
    manifest = Manifest.load(str(ROOT / DATA))
    sp = spm.SentencePieceProcessor(model_file=str(ROOT / DATA / manifest.tokenizer.path))
    ids = torch.tensor([[manifest.bos_id, *sp.encode(prompt)]])
    new = generate(model, ids, tokens, temperature=0.8, top_k=40, bos_id=manifest.bos_id,
                   generator=torch.Generator().manual_seed(seed))
    return prompt + sp.decode(new[0].tolist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help=f"delete {RUN} first and train from scratch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of configs/quickstart.yaml (repeatable)")
    parser.add_argument("--sample-tokens", type=int, default=120, help="tokens to sample at the end (default: 120)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 8)))
    workers = str(min(os.cpu_count() or 1, 4))
    if args.fresh:
        shutil.rmtree(ROOT / RUN, ignore_errors=True)
    if not (ROOT / TOKENIZER).exists():
        run(["-m", "data_prep", "tokenizer", "--vocab-size", "4096", "--out", TOKENIZER, "--threads", workers])
    if not (ROOT / DATA / "manifest.json").exists():
        run(["-m", "data_prep", "shards", "--tokenizer", TOKENIZER, "--out", DATA, "--seq-len", "256",
             "--workers", workers, "--windows-per-shard", "2048"])
    overrides = [x for item in args.overrides for x in ("--set", item)]
    run(["-m", "pretrain", "--config", str(CONFIG.relative_to(ROOT)), "--set", f"run_dir={RUN}",
         "--set", f"data.dir={DATA}", *overrides])
    result = json.loads(run(["-m", "pretrain.eval", "--checkpoint", RUN], capture=True).strip().splitlines()[-1])
    print(f"\n--- sample (prompt {PROMPT!r}, {args.sample_tokens} tokens, temperature 0.8) ---")
    print(sample(ROOT / RUN, PROMPT, args.sample_tokens))
    print("---")
    print(f"\nvalidation loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
          f"(step {result['step']}, {result['windows']} windows of the val split)")
    print(f"checkpoints: {RUN}/checkpoints   metrics: {RUN}/metrics.jsonl")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {RUN}/tensorboard   (then open http://localhost:6006)")
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
