"""Generate text from a checkpoint: ``python -m pretrain.generate --checkpoint PATH --prompt TEXT``.

Each prompt (``--prompt TEXT`` and ``--prompt-file FILE``, repeatable, in the order given; a file is
one prompt, ``-`` is stdin) is encoded with the run's tokenizer after a BOS and read
``--prefill-chunk`` tokens per forward with the recurrent state carried (a long prompt costs the
memory of one chunk); then every new token is one 1-token forward from the state. SLAM does not
stream: it re-reads each prompt and its completion whole for every token. Prompts of different
lengths are read one at a time, then decoded together as one batch.

The tokenizer is ``--tokenizer PATH``, else the export directory's ``tokenizer.model``, else the one in
the run's dataset (``data.dir`` of the checkpoint's config, followed from an export to its source
checkpoint). It must have the model's vocabulary size, and the sha256 the dataset's manifest
recorded when that manifest is readable.

Sampling: ``--temperature`` (0 or ``--greedy``: argmax), ``--top-k`` (0: off), ``--top-p`` (nucleus;
1: off), drawn on the CPU with a generator seeded by ``--seed``. With several prompts each row's
draws depend on the batch: the same prompts and seed give the same completions.

Output: with one prompt the completion is printed as it comes; with several, each completion is
printed when all are done, under a ``--- [i/N] prompt: ... ---`` line. A summary goes to stderr.

``--save-state FILE`` writes (safetensors) the state after the prompts and the generated tokens, the
next-token logits, each row's token count, the sampling generator's state and what was used: arch,
model config, checkpoint, tokenizer. ``--load-state FILE`` continues from it with the same checkpoint
and tokenizer (anything else is refused); prompts are then optional, and if given there must be one
per row: each is appended to its row as more context, without a BOS. The generator is restored
from the file unless ``--seed`` is given, so with the same sampling flags a run stopped after k
tokens and resumed draws exactly the tokens of one run that was not stopped.

Bad input (no checkpoint, a tokenizer that does not fit, an empty prompt, a state file of another
model) is one ``error:`` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from zarvan_dist.config import ConfigError
from zarvan_dist.generation import Context, check_sampling, decode, read
from zarvan_dist.models import CausalLM
from zarvan_dist.tokenizer import BOS_ID, Tokenizer
from zarvan_dist.training.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from zarvan_dist.training.engines import resolve_device

STATE_FORMAT = "zarvan-generation-state"
STATE_VERSION = "1"


class GenerateError(RuntimeError):
    """Bad input: reported as one ``error:`` line and exit status 1."""


def model_sha256(model: CausalLM) -> str:
    """Hash of the model config: a state is only valid for a model of this config."""
    return hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode()).hexdigest()


def read_prompts(given: list[tuple[str, str]]) -> list[str]:
    """The prompt texts of ``--prompt`` (``("text", TEXT)``) and ``--prompt-file`` (``("file", FILE)``)."""
    texts = []
    for k, (kind, value) in enumerate(given, 1):
        if kind == "file":
            try:
                text = sys.stdin.read() if value == "-" else Path(value).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise GenerateError(f"prompt file {value}: {exc}") from None
            label = f"prompt file {value}"
        else:
            text, label = value, f"prompt {k}"
        if text == "":
            raise GenerateError(f"empty prompt ({label})")
        texts.append(text)
    return texts


def encode_prompts(tokenizer: Tokenizer, texts: list[str], continued: bool) -> list[torch.Tensor]:
    """Each text's token ids [n] (int64) as the shards hold a document (``encode_documents``: led by BOS,
    a literal U+2581 in bytes); without the BOS when ``continued`` (text appended to a saved row)."""
    if not texts:
        return []
    tokens, lengths = tokenizer.encode_documents(texts, "int64")
    return [torch.from_numpy(ids[1:] if continued else ids) for ids in np.split(tokens, np.cumsum(lengths)[:-1])]


class TextStream:
    """The text of a growing list of token ids, handed out as it becomes final.

    Text ending in U+FFFD may be a character whose bytes (byte-fallback pieces) are still coming,
    so it is held back until a later token completes it or ``flush``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        """Add one token; returns the text that became final."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._take(text)

    def flush(self) -> str:
        """The text not handed out yet."""
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        out, self.sent = text[self.sent:], len(text)
        return out


def state_metadata(checkpoint: Checkpoint, model: CausalLM, tokenizer: Tokenizer, context: Context) -> dict[str, str]:
    """What a state file records of its making (safetensors metadata: strings)."""
    return {
        "format": STATE_FORMAT, "version": STATE_VERSION, "arch": model.config.arch,
        "model_sha256": model_sha256(model), "checkpoint": str(checkpoint.path), "step": json.dumps(checkpoint.step),
        "tokenizer_sha256": tokenizer.sha256, "bos_id": str(BOS_ID), "rows": str(context.rows),
        "tokens": json.dumps(context.lengths.tolist()),
    }


def save_state(path: str, context: Context, generator: torch.Generator, metadata: dict[str, str]) -> None:
    """Write the context and the generator's state to ``path`` (safetensors, replaced atomically)."""
    tensors = {**context.to_tensors(), "generator": generator.get_state()}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_state(path: str, checkpoint: Checkpoint, model: CausalLM, tokenizer: Tokenizer) -> tuple[Context, torch.Tensor]:
    """The context and generator state saved in ``path``, refused unless made with this model and tokenizer."""
    if not Path(path).is_file():
        raise GenerateError(f"state file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise GenerateError(f"state file {path} is not a safetensors file ({exc})") from None
    if meta.get("format") != STATE_FORMAT:
        raise GenerateError(f"{path} is not a generation state (written by python -m pretrain.generate --save-state)")
    if meta.get("version") != STATE_VERSION:
        raise GenerateError(f"{path}: state format version {meta.get('version')}, this reader knows {STATE_VERSION}")
    arch = model.config.arch
    if meta.get("arch") != arch or meta.get("model_sha256") != model_sha256(model):
        raise GenerateError(f"{path} is the state of another model ({meta.get('arch')} of {meta.get('checkpoint')}), "
                            f"not of this {arch} model of {checkpoint.path}")
    if meta.get("checkpoint") != str(checkpoint.path):
        raise GenerateError(f"{path} was saved with checkpoint {meta.get('checkpoint')} (step {meta.get('step')}), "
                            f"not {checkpoint.path} (step {checkpoint.step})")
    if meta.get("tokenizer_sha256") != tokenizer.sha256:
        saved = str(meta.get("tokenizer_sha256"))[:12]
        raise GenerateError(f"{path} was saved with another tokenizer (sha256 {saved}...) "
                            f"than {tokenizer.url} (sha256 {tokenizer.sha256[:12]}...)")
    if "generator" not in tensors:
        raise GenerateError(f"{path}: no generator state")
    device = next(model.parameters()).device
    try:
        context = Context.from_tensors(tensors, device)
        context.check(model)
    except ValueError as exc:
        raise GenerateError(f"{path}: {exc}") from None
    return context, tensors["generator"]


def _preview(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def run(args: argparse.Namespace) -> None:
    """The command: everything ``main`` does but the error reporting."""
    temperature = 0.0 if args.greedy else args.temperature
    top_k = args.top_k or None
    check_sampling(temperature, top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    if args.prefill_chunk < 1:
        raise GenerateError(f"--prefill-chunk: expected >= 1, got {args.prefill_chunk}")
    texts = read_prompts(args.prompts)
    if not texts and not args.load_state:
        raise GenerateError("no prompt: give --prompt TEXT or --prompt-file FILE (or --load-state FILE)")
    checkpoint = open_checkpoint(args.checkpoint)
    if not checkpoint.model_config.causal:
        raise GenerateError(f"{checkpoint.path}: a {checkpoint.model_config.arch} classifier (causal: false) "
                            f"does not generate")
    tokenizer = checkpoint.tokenizer(args.tokenizer)
    model = checkpoint.load_model(resolve_device(args.device))
    generator = torch.Generator()
    context = None
    if args.load_state:
        context, saved_generator = load_state(args.load_state, checkpoint, model, tokenizer)
        if texts and len(texts) != context.rows:
            raise GenerateError(f"{len(texts)} prompts given to continue a state of {context.rows} rows "
                                f"(give none, or one per row)")
        if args.seed is None:
            generator.set_state(saved_generator)
    if args.seed is not None or context is None:
        generator.manual_seed(args.seed or 0)
    rows = encode_prompts(tokenizer, texts, continued=context is not None)
    start = time.perf_counter()
    if rows:
        context = read(model, context, rows, BOS_ID, args.prefill_chunk)
    read_s = time.perf_counter() - start
    stream = TextStream(tokenizer) if context.rows == 1 else None

    def show(tokens: torch.Tensor) -> None:
        if stream is not None:
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()

    start = time.perf_counter()
    new, context = decode(model, context, args.max_new_tokens, temperature, top_k, args.top_p, BOS_ID,
                          generator, on_token=show)
    decode_s = time.perf_counter() - start
    if stream is not None:
        print(stream.flush(), flush=True)
    else:
        labels = texts or [f"row {i + 1} of {args.load_state}" for i in range(context.rows)]
        for i, ids in enumerate(new.tolist()):
            print(f"--- [{i + 1}/{context.rows}] prompt: {_preview(labels[i])} ---\n{tokenizer.decode(ids)}", flush=True)
    if args.save_state:
        save_state(args.save_state, context, generator, state_metadata(checkpoint, model, tokenizer, context))
    read_tokens = sum(len(r) for r in rows)
    print(f"generate: {model.config.arch} of {checkpoint.path}: read {read_tokens} tokens in {read_s:.2f} s, "
          f"generated {new.shape[1]} per row in {decode_s:.2f} s ({new.numel() / max(decode_s, 1e-9):.1f} tokens/s), "
          f"rows at {context.lengths.tolist()} tokens"
          + (f"; state saved to {args.save_state}" if args.save_state else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint directory, a run directory / checkpoints root (its latest) "
                             "or a pretrain.export directory")
    parser.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                        type=lambda text: ("text", text), help="a prompt (repeatable: a batch)")
    parser.add_argument("--prompt-file", dest="prompts", action="append", metavar="FILE",
                        type=lambda path: ("file", path), help="a file whose whole text is one prompt; - is stdin "
                                                              "(repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="tokens to generate per prompt (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="softmax temperature; 0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=40, metavar="K",
                        help="sample among the K most likely tokens; 0: all (default: 40)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus: sample among the fewest most likely tokens holding probability P; "
                             "1: all (default: 1)")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (= --temperature 0)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="seed of the sampling generator (default: 0; with --load-state: the saved generator)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="sentencepiece model (default: the run's, from its dataset or the export directory)")
    parser.add_argument("--prefill-chunk", type=int, default=1024, metavar="N",
                        help="prompt tokens per forward, the state carried between them (default: 1024)")
    parser.add_argument("--save-state", default=None, metavar="FILE",
                        help="write the state after the prompts and the generated tokens (safetensors)")
    parser.add_argument("--load-state", default=None, metavar="FILE",
                        help="continue from a state written by --save-state (prompts are appended to its rows)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (GenerateError, ConfigError, CheckpointError, ValueError, OSError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
