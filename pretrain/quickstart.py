"""`make quickstart` for now: build every named model size and run a forward pass.

The trainer does not exist yet; until it does, the quickstart checks that each arch's named
sizes in configs/models/ build, and that each streams a short sequence in two windows with its
state carried. ``python -m pretrain.quickstart [--sizes debug 125m]``.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from zarvan_dist import ModelConfig, build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["debug", "125m", "350m", "1b"],
                        help="named sizes to build (default: all)")
    args = parser.parse_args(argv)
    print("The trainer is not built yet: this quickstart builds each named model size and runs a forward pass.")
    print(f"{'config':<22}{'params':>14}{'GFLOP/token@2048':>18}{'build s':>9}{'forward s':>10}")
    torch.manual_seed(0)
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.stem.rsplit("-", 1)[1] not in args.sizes:
            continue
        cfg = ModelConfig.from_yaml(path)
        start = time.perf_counter()
        model = build_model(cfg).eval()
        built = time.perf_counter()
        ids = torch.randint(0, cfg.vocab_size, (1, 16))
        with torch.no_grad():
            first = model(ids[:, :8])
            logits = model(ids[:, 8:], first.state).logits  # the second window continues the first
        if not torch.isfinite(logits).all():
            raise SystemExit(f"{path.name}: non-finite logits")
        done = time.perf_counter()
        print(f"{path.stem:<22}{model.num_params():>14,}{model.flops_per_token(2048) / 1e9:>18.3f}"
              f"{built - start:>9.1f}{done - built:>10.2f}")
        del model, first, logits
        gc.collect()


if __name__ == "__main__":
    main()
