"""The causal LMs as Hugging Face ``transformers`` models: config, model with ``generate()``, tokenizer.

A directory written by ``write_hf`` (``python -m pretrain.export --format hf``) holds::

    config.json              ZarvanDistConfig: the ModelConfig under ``zarvan_model``, special token ids,
                             ``auto_map`` to hf.py; ``zarvan_export`` says where the weights came from
    generation_config.json   transformers' generation defaults (from the special token ids)
    model.safetensors        every weight in float32 under ``model.`` (the wrapped CausalLM), tied ones once
    hf.py                    a copy of this module, for ``trust_remote_code=True`` (it imports zarvan_dist)
    tokenizer.model          the run's sentencepiece model                                  (with a tokenizer)
    tokenizer_config.json    ZarvanDistTokenizer's settings and ``auto_map``                  (with a tokenizer)

Load it with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (or call
``register()`` first and leave out ``trust_remote_code``), and the native model with
``zarvan_dist.training.checkpoint.open_checkpoint(DIR).load_model()``.

Generation carries the recurrent state: the first forward reads the prompt, every later one only the
new token, with the ``RecurrentState`` held in ``past_key_values`` (a ``RecurrentStateCache``), as
``zarvan_dist.generation.generate`` does. A model that does not stream (slam) re-reads the whole
sequence each step. As in training, the state is reset before every ``bos_token_id`` (each document
starts with BOS); a left-padded batch is reset before each row's first real token, so padding changes
nothing. Right padding, ``inputs_embeds``, retrieval neighbours and assisted decoding are not supported.

The tokenizer is the project's sentencepiece model encoding exactly as ``data_prep`` did for
training (``zarvan_dist.tokenizer.encode_documents``: a literal U+2581 is spelled in bytes, text that
looks like ``<s>`` is plain text), so ``decode(encode(text), skip_special_tokens=True) == text``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizer,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The name transformers gives the cache in model inputs and outputs (``cache`` from 5.2x, before that
``past_key_values``); forward and prepare_inputs_for_generation take either."""

from zarvan_dist.models import ModelConfig, RecurrentState, build_model
from zarvan_dist.models.common import CausalLM
from zarvan_dist.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, check_tokenizer, encode_documents, load_tokenizer
from zarvan_dist.training.checkpoint import HF_MODEL_TYPE, HF_PREFIX


class ZarvanDistConfig(PretrainedConfig):
    """A ``transformers`` config holding the project's ``ModelConfig`` as a dict (``zarvan_model``).

    ``bos_token_id`` (when set) marks document starts: the model resets its state before each one,
    as the trainer did. ``tie_word_embeddings`` follows ``tie_embeddings``.
    """

    model_type = HF_MODEL_TYPE

    def __init__(self, zarvan_model: dict[str, Any] | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **kwargs: Any) -> None:
        # transformers builds a config with no arguments to find the defaults it leaves out of config.json
        self.zarvan_model = dict(zarvan_model or {})
        if self.zarvan_model:
            cfg = self.model_config
            if not cfg.causal:
                raise ValueError(f"only causal LMs have a transformers form; arch {cfg.arch} has causal: false")
            kwargs.update(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, tie_word_embeddings=cfg.tie_embeddings)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def model_config(self) -> ModelConfig:
        """The project's ModelConfig (validated)."""
        return ModelConfig.from_dict(self.zarvan_model)


class RecurrentStateCache:
    """``past_key_values`` of ZarvanDistForCausalLM: the recurrent state after the tokens read so far.

    Every forward given this cache reads its tokens after ``seen`` and updates it in place, the way
    transformers' caches are updated.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: RecurrentState | None = None, seen: int = 0) -> None:
        self.state = state
        self.seen = seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read into the state."""
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` [B'] (beam search), in place."""
        if self.state is not None:
            self.state = self.state.select(beam_idx)


class ZarvanDistForCausalLM(PreTrainedModel, GenerationMixin):
    """A zarvan_dist causal LM (``.model``, any arch) behind transformers' causal-LM interface."""

    config_class = ZarvanDistConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {f"{HF_PREFIX}head.weight": f"{HF_PREFIX}embed.weight"}  # used when tie_word_embeddings
    _is_stateful = True  # no assisted decoding: a recurrent state cannot be rolled back

    def __init__(self, config: ZarvanDistConfig, model: CausalLM | None = None) -> None:
        super().__init__(config)
        self.model = model if model is not None else build_model(config.model_config)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The wrapped model initialised itself when it was built (each arch has its own rule), and
        # from_pretrained loads every weight: transformers' generic initialisation would undo both.
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state travels in a RecurrentStateCache, made by forward

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def document_starts(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """Where the state resets before a token of ``input_ids`` [B, T]: [B, T] bool, or None for nowhere.

        Before every ``bos_token_id``, and before the first real token of a left-padded row.
        ``attention_mask`` [B, L >= T] covers the tokens read before (L - T of them) and these.
        """
        starts = input_ids == self.config.bos_token_id if self.config.bos_token_id is not None else None
        if attention_mask is None:
            return starts
        length = input_ids.shape[1]
        mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if mask.dim() != 2 or mask.shape[0] != input_ids.shape[0] or mask.shape[1] < length:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not cover input_ids "
                             f"{tuple(input_ids.shape)} (expected [batch, tokens read so far + {length}])")
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("attention_mask: only left padding is supported (a 0 after a 1)")
        first = mask & ~F.pad(mask, (1, 0))[:, :-1]
        first[:, 0] = False  # a row without padding starts where the state starts anyway
        first = first[:, -length:]
        if not first.any():
            return starts
        return first if starts is None else starts | first

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                past_key_values: RecurrentStateCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                cache: RecurrentStateCache | None = None) -> CausalLMOutputWithPast | tuple:
        """input_ids [B, T] int64, read after ``past_key_values`` (updated in place) when given.

        ``attention_mask`` [B, L]: 1 for tokens, 0 for left padding (L = tokens read so far + T).
        ``labels`` [B, T]: the next-token loss of ``logits[:, :-1]`` against ``labels[:, 1:]``
        (-100 ignored). Returns logits [B, T, V] (float32 for a float32 model) and, with
        ``use_cache`` (default) and a streaming model, the cache after these tokens.
        """
        past_key_values = cache if cache is not None else past_key_values
        use_cache = True if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        state = past_key_values.state if past_key_values is not None else None
        out = self.model(input_ids, state, self.document_starts(input_ids, attention_mask))
        cache = None
        if use_cache and self.model.streams:
            cache = past_key_values if past_key_values is not None else RecurrentStateCache()
            cache.state, cache.seen = out.state, cache.seen + input_ids.shape[1]
        loss = None
        if labels is not None:
            targets = labels[:, 1:].flatten().to(out.logits.device)
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100)
        if not return_dict:
            return tuple(v for v in (loss, out.logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **{CACHE_KEY: cache})

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: RecurrentStateCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool | None = None,
                                      cache: RecurrentStateCache | None = None, **kwargs: Any) -> dict[str, Any]:
        """The tokens not yet in the state (all of them for a model that does not stream)."""
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None and self.model.streams:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        else:
            past_key_values = None
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs = {k: v.to(self.device) if v is not None else None for k, v in inputs.items()}
        return {**inputs, CACHE_KEY: past_key_values, "use_cache": use_cache}


class ZarvanDistTokenizer(PreTrainedTokenizer):
    """The project's sentencepiece tokenizer; ``tokenizer(text)`` gives [BOS] + the ids training saw.

    Pieces come from ``zarvan_dist.tokenizer.encode_documents``, so the ids are exactly those of the
    shards; special-token text in the input is never turned into a special id (``split_special_tokens``).
    ``decode(ids, skip_special_tokens=True)`` is sentencepiece's decode, the inverse of the encoding.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.sp_model = load_tokenizer(str(vocab_file)).processor  # the checks every job makes
        sp = self.sp_model
        for name, index in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                            ("pad_token", sp.pad_id())):
            if index >= 0:
                kwargs.setdefault(name, sp.id_to_piece(index))
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("padding_side", "left")  # the model resets its state at each row's first token
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        ids = encode_documents(self.sp_model, [text], "uint32")[0][1:]  # without its BOS
        return [self.sp_model.id_to_piece(int(i)) for i in ids]

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode([self.sp_model.piece_to_id(t) for t in tokens])

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """sentencepiece's decode of each run of ordinary ids; special ids as their text, or left out."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        special = set(self.all_special_ids)
        parts, run = [], []
        for i in ids:
            if i not in special:
                run.append(i)
                continue
            parts.append(self.sp_model.decode(run))
            run = []
            if not skip_special_tokens:
                parts.append(self.convert_ids_to_tokens(i))
        parts.append(self.sp_model.decode(run))
        return "".join(parts)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """BOS before each sequence: every training document starts with one."""
        bos = [self.bos_token_id]
        return bos + token_ids_0 + (bos + token_ids_1 if token_ids_1 is not None else [])

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [int(i in self.all_special_ids) for i in token_ids_0 + (token_ids_1 or [])]
        return [1] + [0] * len(token_ids_0) + ([1] + [0] * len(token_ids_1) if token_ids_1 is not None else [])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if not out.exists() or not out.samefile(self.vocab_file):
            out.write_bytes(self.sp_model.serialized_model_proto())
        return (str(out),)


# save_pretrained copies this module next to the files and writes auto_map, for trust_remote_code
ZarvanDistConfig.register_for_auto_class()
ZarvanDistForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ZarvanDistTokenizer.register_for_auto_class("AutoTokenizer")


def register() -> None:
    """Make the Auto classes know ``model_type: zarvan_dist`` (then no ``trust_remote_code`` is needed)."""
    AutoConfig.register(HF_MODEL_TYPE, ZarvanDistConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZarvanDistConfig, ZarvanDistForCausalLM, exist_ok=True)
    AutoTokenizer.register(ZarvanDistConfig, slow_tokenizer_class=ZarvanDistTokenizer, exist_ok=True)


def write_hf(model: CausalLM, out_dir: str | Path, tokenizer: Tokenizer | None = None,
             export: dict[str, Any] | None = None) -> None:
    """Write ``model`` and, when given, its ``tokenizer`` (checked to fit it) as an HF directory.

    The tokenizer's special ids become the config's ``bos_token_id`` (document starts: the state is
    reset before each), ``eos_token_id`` and ``pad_token_id``. ``export`` (plain data, e.g. the
    source checkpoint and step) is kept in config.json as ``zarvan_export``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special: dict[str, int] = {}
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config.vocab_size)
        special = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        (out / "tokenizer.model").write_bytes(tokenizer.data)
        ZarvanDistTokenizer(vocab_file=str(out / "tokenizer.model")).save_pretrained(str(out))
    config = ZarvanDistConfig(zarvan_model=model.config.to_dict(), zarvan_export=export or {}, **special)
    ZarvanDistForCausalLM(config, model).save_pretrained(str(out), max_shard_size=1 << 60)  # one file, unsharded
