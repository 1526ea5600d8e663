"""Export a checkpoint of any engine as one consolidated model: natively, or for Hugging Face transformers.

``python -m pretrain.export [--format native|hf] CHECKPOINT OUT_DIR`` reads a checkpoint directory (or a
run directory / checkpoints root: its latest) written by ``single``, ``ddp``, ``fsdp`` (DCP shards, read
without a process group) or ``deepspeed`` (any ZeRO stage, consolidated with DeepSpeed's ``zero_to_fp32``)
and writes, in one process on the CPU, with ``--format native`` (the default):

    OUT_DIR/model.safetensors   every weight in float32, full (unsharded) shapes; tied tensors once
    OUT_DIR/config.yaml         the model config (``ModelConfig``), enough to rebuild the model
    OUT_DIR/export.json         source checkpoint, step, engine, tokens seen, parameter count

Load it with ``zarvan_dist.training.checkpoint.open_checkpoint(OUT_DIR).load_model()``;
``pretrain.generate --checkpoint OUT_DIR`` finds the tokenizer through the source checkpoint's dataset.

With ``--format hf`` (needs the ``hf`` extra: transformers) it writes a transformers directory, the
run's tokenizer included (see ``zarvan_dist.hf``): config.json (the model config, special token ids,
and this file's export.json fields as ``zarvan_export``), generation_config.json, model.safetensors,
hf.py, tokenizer.model and tokenizer_config.json. Load it with
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` and ``AutoTokenizer``
likewise (or call ``zarvan_dist.hf.register()`` first), or natively with ``open_checkpoint`` as above.

The transformers export's tokenizer is ``--tokenizer URL``, else the sentencepiece model of the run's
dataset (``data.dir`` of the checkpoint's config); it is checked as every job checks it (``zarvan_dist.tokenizer.check_tokenizer``:
the model's vocabulary size, and the sha256 the dataset's manifest recorded).

OUT_DIR must be new or empty; ``--overwrite`` replaces an earlier export there (a directory holding
export.json or a zarvan_dist config.json). The files are written to a temporary directory beside
OUT_DIR, which takes its place once complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml
from safetensors.torch import save_model

from zarvan_dist.config import ConfigError
from zarvan_dist.models import CausalLM, ModelConfig
from zarvan_dist.training.checkpoint import (
    CONFIG_FILE,
    EXPORT_FILE,
    MODEL_FILE,
    CheckpointError,
    is_hf_export,
    open_checkpoint,
    write_json,
)

FORMATS = ("native", "hf")


class ExportError(RuntimeError):
    """The export cannot be written: an output directory in the way, a missing extra, a bad option."""


def export(checkpoint: str | Path, out_dir: str | Path, format: str = "native", overwrite: bool = False,
           tokenizer: str | None = None) -> Path:
    """Write the export of ``checkpoint`` in ``format`` (``native`` or ``hf``) to ``out_dir``; returns the
    checkpoint exported. ``tokenizer`` (hf only) is a sentencepiece model URL; None: the run's."""
    if format not in FORMATS:
        raise ExportError(f"format: {format!r} is not one of {list(FORMATS)}")
    if tokenizer is not None and format != "hf":
        raise ExportError("a tokenizer goes with --format hf (a native export finds the run's through its source)")
    source = open_checkpoint(checkpoint)
    if source.is_export:
        raise ExportError(f"{source.path} is an export already; give the checkpoint it was exported from "
                          f"({source.info.get('source')})")
    out = Path(out_dir).absolute()
    check_out_dir(out, overwrite)
    write_hf = hf_writer(source.model_config) if format == "hf" else None
    spm_model = source.tokenizer(tokenizer) if format == "hf" else None
    model = source.load_model("cpu")
    info = {
        "source": str(source.path), "step": source.step, "tokens": source.info.get("tokens"),
        "engine": source.engine, "world_size": source.info.get("world_size", 1), "parameters": model.num_params(),
    }
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if write_hf is not None:
            write_hf(model, tmp, tokenizer=spm_model, export={**info, "tokenizer": spm_model.url})
        else:
            write_native(tmp, model, source.config["model"], info)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return source.path


def write_native(out: Path, model: CausalLM, model_config: dict, info: dict) -> None:
    """The native export's files (see the module docstring) in directory ``out``."""
    save_model(model, str(out / MODEL_FILE))
    (out / CONFIG_FILE).write_text(yaml.safe_dump({"model": model_config}, sort_keys=False))
    write_json(out / EXPORT_FILE, info)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output location that is a file, or a non-empty directory unless ``overwrite`` and it
    holds an earlier export (never delete a directory that is something else)."""
    if not out.name:
        raise ExportError(f"{out}: not a directory name an export can take")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} is not empty; pass --overwrite to replace the export in it")
    if not ((out / EXPORT_FILE).is_file() or is_hf_export(out)):
        raise ExportError(f"{out} holds no export (no export.json, no zarvan_dist config.json); not replacing it")


def hf_writer(model_cfg: ModelConfig):
    """``zarvan_dist.hf.write_hf``, once the model is known to have a transformers form."""
    if not model_cfg.causal:
        raise ExportError(f"only causal LMs export to transformers; this {model_cfg.arch} model has causal: false")
    try:
        from zarvan_dist.hf import write_hf
    except ImportError as exc:
        raise ExportError(f"--format hf needs transformers (pip install 'zarvan-dist[hf]'): {exc}") from None
    return write_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory / checkpoints root (its latest)")
    parser.add_argument("out_dir", help="directory to write the export into (new or empty, or see --overwrite)")
    parser.add_argument("--format", choices=FORMATS, default="native",
                        help="native: model.safetensors + config.yaml + export.json (default); hf: a transformers "
                             "directory with the tokenizer")
    parser.add_argument("--tokenizer", default=None, metavar="URL",
                        help="--format hf: the sentencepiece model to ship (default: the run's dataset's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir")
    args = parser.parse_args(argv)
    try:
        source = export(args.checkpoint, args.out_dir, args.format, args.overwrite, args.tokenizer)
    except (ConfigError, CheckpointError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {source} -> {args.out_dir} ({args.format})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
