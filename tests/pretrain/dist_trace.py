"""``python -m pretrain`` with every batch a rank reads recorded (an entry for the distributed tests, not a test).

Run as ``torchrun ... tests/pretrain/dist_trace.py --config RUN.yaml ...``: each rank appends one
JSON line per micro-step batch to ``RUN/trace-rank{RANK}.jsonl``: split, the dataset, micro-step, rows
(global with one dataset; a mixture's are each source's own), window indices and resets. With ``TRACE_NAN_RANK=r`` and ``TRACE_NAN_CALLS=4,5`` the training loss of
those micro-steps (0-based) is NaN on rank r only. Everything else is the real trainer.
"""

from __future__ import annotations

import json
import os
import sys

import pretrain.train as train
import zarvan_dist.data.loader as loader
import zarvan_dist.training.evaluate as evaluate
from zarvan_dist.data.loader import LaneLoader


class TracedLaneLoader(LaneLoader):
    def __init__(self, url, split, layout, **kwargs):
        super().__init__(url, split, layout, **kwargs)
        self.split = split

    def __iter__(self):
        path = os.path.join(_RUN_DIR, f"trace-rank{os.environ.get('RANK', '0')}.jsonl")
        inner = super().__iter__()
        try:
            for batch in inner:
                with open(path, "a") as f:
                    f.write(json.dumps({"split": self.split, "url": self.dataset.url, "step": int(batch.step), "rows": [int(r) for r in batch.rows],
                                        "windows": [int(w) for w in batch.windows],
                                        "reset": [bool(r) for r in batch.reset]}) + "\n")
                yield batch
        finally:
            inner.close()


_RUN_DIR = "."


def _inject_nans() -> None:
    rank, calls = os.environ.get("TRACE_NAN_RANK"), os.environ.get("TRACE_NAN_CALLS")
    if rank is None or calls is None or rank != os.environ.get("RANK", "0"):
        return
    import torch

    bad = {int(c) for c in calls.split(",")}
    original, count = train.next_token_loss, [0]

    def next_token_loss(logits, targets):
        loss = original(logits, targets)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        count[0] += 1
        return loss * float("nan") if count[0] - 1 in bad else loss

    train.next_token_loss = next_token_loss

if __name__ == "__main__":
    from zarvan_dist.training.config import load_run_config

    argv = sys.argv[1:]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    _RUN_DIR = load_run_config(argv[argv.index("--config") + 1], overrides).run_dir
    os.makedirs(_RUN_DIR, exist_ok=True)
    loader.LaneLoader = evaluate.LaneLoader = TracedLaneLoader  # the train lanes (MixtureLoader's) and the val lanes
    _inject_nans()
    sys.exit(train.main(argv))
