"""Evaluate a checkpoint on a split: ``python -m pretrain.eval --checkpoint PATH [--split val]``.

The split's windows are dealt to ``--rows`` lanes (as in training) and read in order from each
lane's start with the recurrent state carried from window to window; a retrieval model reads the
neighbours the run read (``data.neighbours``) or those ``--neighbours`` names. Prints one JSON
object: checkpoint, step, split, loss (mean next-token cross-entropy, nats), perplexity, tokens, windows.
"""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.train import Trainer
from zarvan_dist.config import ConfigError, apply_overrides, load_yaml
from zarvan_dist.data import SPLITS, DatasetError
from zarvan_dist.training.checkpoint import CheckpointError, resolve_checkpoint
from zarvan_dist.training.config import RunConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint directory, or a run directory / checkpoints root (its latest)")
    parser.add_argument("--split", choices=SPLITS, default="val", help="split to evaluate (default: val)")
    parser.add_argument("--rows", type=int, default=None, help="lanes read side by side (default: the run's eval.rows)")
    parser.add_argument("--steps", type=int, default=0,
                        help="windows per lane (default 0: every window of the lanes once)")
    parser.add_argument("--data-dir", default=None, metavar="URL", help="dataset to read (default: the run's data.dir)")
    parser.add_argument("--neighbours", default=None, metavar="URL|none",
                        help="neighbour sidecar of the dataset for a retrieval model (default: the run's "
                             "data.neighbours); none: evaluate without retrieved text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    args = parser.parse_args(argv)
    try:
        path = resolve_checkpoint(args.checkpoint)
        overrides = ["engine=single", f"train.device={args.device}"] + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
        if args.neighbours is not None:
            overrides.append(f"data.neighbours={'null' if args.neighbours == 'none' else args.neighbours}")
        cfg = RunConfig.from_dict(apply_overrides(load_yaml(path / "config.yaml"), overrides))
        trainer = Trainer(cfg)
        trainer.load_weights(path)
        result = trainer.evaluate(args.split, rows=args.rows or cfg.eval.rows, steps=args.steps)
    except (ConfigError, DatasetError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    step = json.loads((path / "trainer.json").read_text())["step"]
    print(json.dumps({"checkpoint": str(path), "step": step, "split": args.split, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
