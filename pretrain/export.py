"""Export a checkpoint of any engine to one consolidated safetensors file plus its config.

``python -m pretrain.export CHECKPOINT OUT_DIR`` reads a checkpoint directory (or a run directory /
checkpoints root: its latest) written by ``single``, ``ddp``, ``fsdp`` (DCP shards, read without a
process group) or ``deepspeed`` (any ZeRO stage, consolidated with DeepSpeed's ``zero_to_fp32``)
and writes, in one process on the CPU:

    OUT_DIR/model.safetensors   every weight in float32, full (unsharded) shapes; tied tensors once
    OUT_DIR/config.yaml         the model config (``ModelConfig``), enough to rebuild the model
    OUT_DIR/export.json         source checkpoint, step, engine, tokens seen, parameter count

Load it with ``zarvan_dist.training.checkpoint.load_checkpoint_model(OUT_DIR)`` or build the model
from ``config.yaml`` and ``safetensors.torch.load_model`` the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from safetensors.torch import save_model

from zarvan_dist.config import ConfigError
from zarvan_dist.models import ModelConfig, build_model
from zarvan_dist.training.checkpoint import CheckpointError, load_weights, resolve_checkpoint, write_json


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/{model.safetensors, config.yaml, export.json}``; returns the checkpoint exported."""
    path = resolve_checkpoint(checkpoint)
    config = yaml.safe_load((path / "config.yaml").read_text())
    trainer = json.loads((path / "trainer.json").read_text())
    model_cfg = ModelConfig.from_dict(config["model"])
    model = build_model(model_cfg)
    load_weights(model, path, "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump({"model": config["model"]}, sort_keys=False))
    write_json(out / "export.json", {
        "source": str(path), "step": trainer["step"], "tokens": trainer.get("tokens"),
        "engine": trainer.get("engine", "single"), "world_size": trainer.get("world_size", 1),
        "parameters": model.num_params(),
    })
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory / checkpoints root (its latest)")
    parser.add_argument("out_dir", help="directory to write model.safetensors, config.yaml and export.json into")
    args = parser.parse_args(argv)
    try:
        source = export(args.checkpoint, args.out_dir)
    except (ConfigError, CheckpointError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {source} -> {Path(args.out_dir) / 'model.safetensors'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
