"""Export a checkpoint of any engine as one consolidated model: natively, or for Hugging Face transformers.

``python -m pretrain.export [--format native|hf] CHECKPOINT OUT_DIR`` reads a checkpoint directory (or a
run directory / checkpoints root: its latest) written by ``single``, ``ddp``, ``fsdp`` (DCP shards, read
without a process group) or ``deepspeed`` (any ZeRO stage, consolidated with DeepSpeed's ``zero_to_fp32``)
and writes, in one process on the CPU, with ``--format native`` (the default):

    OUT_DIR/model.safetensors   every weight in float32, full (unsharded) shapes; tied tensors once
    OUT_DIR/config.yaml         the model config (``ModelConfig``), enough to rebuild the model
    OUT_DIR/export.json         source checkpoint, step, engine, tokens seen, parameter count

Load it with ``zarvan_dist.training.checkpoint.load_checkpoint_model(OUT_DIR)`` or build the model
from ``config.yaml`` and ``safetensors.torch.load_model`` the weights.

With ``--format hf`` (needs the ``hf`` extra: transformers) it writes a transformers directory, the
run's tokenizer included (see ``zarvan_dist.hf``): config.json (the model config, special token ids,
and this file's export.json fields as ``zarvan_export``), generation_config.json, model.safetensors,
hf.py, tokenizer.model and tokenizer_config.json. The tokenizer is the sentencepiece model of the
run's dataset (``data.dir`` of the checkpoint's config), or ``--tokenizer URL``. Load it with
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` and ``AutoTokenizer``
likewise (or call ``zarvan_dist.hf.register()`` first), or natively with ``zarvan_dist.hf.load_zarvan``.

OUT_DIR must be new or empty; ``--overwrite`` replaces an earlier export there (a directory holding
export.json or a zarvan_dist config.json). The files are written to a temporary directory beside
OUT_DIR, which takes its place once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml
from safetensors.torch import save_model

from zarvan_dist.config import ConfigError
from zarvan_dist.data.manifest import Manifest, dataset_root
from zarvan_dist.models import ModelConfig, build_model
from zarvan_dist.tokenizer import TokenizerError, load_tokenizer
from zarvan_dist.training.checkpoint import CheckpointError, load_weights, resolve_checkpoint, write_json

FORMATS = ("native", "hf")


class ExportError(RuntimeError):
    """The export cannot be written: an output directory in the way, a missing extra or tokenizer."""


def export(checkpoint: str | Path, out_dir: str | Path, format: str = "native", overwrite: bool = False,
           tokenizer: str | None = None) -> Path:
    """Write the export of ``checkpoint`` in ``format`` (``native`` or ``hf``) to ``out_dir``; returns the
    checkpoint exported. ``tokenizer`` (hf only) is a sentencepiece model URL; None: the run's."""
    if format not in FORMATS:
        raise ExportError(f"format: {format!r} is not one of {list(FORMATS)}")
    if tokenizer is not None and format != "hf":
        raise ExportError("a tokenizer goes with --format hf")
    path = resolve_checkpoint(checkpoint)
    out = Path(out_dir).absolute()
    check_out_dir(out, overwrite)
    config = yaml.safe_load((path / "config.yaml").read_text())
    trainer = json.loads((path / "trainer.json").read_text())
    model_cfg = ModelConfig.from_dict(config["model"])
    if format == "hf":
        write_hf = hf_writer(model_cfg)
        tokenizer, tokenizer_bytes = run_tokenizer(config, model_cfg, tokenizer)
    model = build_model(model_cfg)
    load_weights(model, path, "cpu")
    info = {
        "source": str(path), "step": trainer["step"], "tokens": trainer.get("tokens"),
        "engine": trainer.get("engine", "single"), "world_size": trainer.get("world_size", 1),
        "parameters": model.num_params(),
    }
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if format == "hf":
            write_hf(model, tmp, tokenizer=tokenizer_bytes, export={**info, "tokenizer": tokenizer})
        else:
            save_model(model, str(tmp / "model.safetensors"))
            (tmp / "config.yaml").write_text(yaml.safe_dump({"model": config["model"]}, sort_keys=False))
            write_json(tmp / "export.json", info)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


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
    try:
        is_hf_export = json.loads((out / "config.json").read_text()).get("model_type") == "zarvan_dist"
    except (OSError, ValueError, AttributeError):
        is_hf_export = False
    if not ((out / "export.json").is_file() or is_hf_export):
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


def run_tokenizer(config: dict, model_cfg: ModelConfig, tokenizer: str | None) -> tuple[str, bytes]:
    """The URL and bytes of the sentencepiece model ``tokenizer``, else of the run's dataset (``data.dir``),
    checked to be lossless and to fit the model."""
    manifest, why = None, "the checkpoint's config names no data.dir to take the tokenizer from"
    data_dir = (config.get("data") or {}).get("dir")
    if data_dir:
        try:
            manifest = Manifest.load(data_dir)
        except (ConfigError, ImportError, OSError, ValueError) as exc:  # e.g. s3:// without s3fs, moved away
            why = f"the run's dataset: {exc}"
    explicit = tokenizer is not None
    if not explicit:
        if manifest is None:
            raise ExportError(f"{why}; pass --tokenizer")
        tokenizer = f"{dataset_root(data_dir)}/{manifest.tokenizer.path}"
    elif manifest is None:
        print(f"note: {why}; the tokenizer is not checked against it", file=sys.stderr)
    try:
        loaded = load_tokenizer(tokenizer)
        sp, data = loaded.processor, loaded.data
    except TokenizerError as exc:
        raise ExportError(f"{exc}" + ("" if explicit else "; pass --tokenizer")) from None
    if sp.get_piece_size() > model_cfg.vocab_size or (manifest is not None and sp.bos_id() != manifest.bos_id):
        raise ExportError(f"tokenizer {tokenizer}: {sp.get_piece_size()} pieces, BOS {sp.bos_id()}; the model reads "
                          f"a vocabulary of {model_cfg.vocab_size}: not the run's tokenizer")
    if manifest is not None:
        manifest.check_tokenizer(tokenizer, data, data_dir)
    return tokenizer, data


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
    except (ConfigError, CheckpointError, ExportError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {source} -> {args.out_dir} ({args.format})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
