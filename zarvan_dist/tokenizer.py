"""The sentencepiece tokenizer every job shares: loading a model, checking it, encoding documents.

A model trained by ``python -m data_prep tokenizer`` never changes text before splitting it
(identity normalisation, whitespace kept as is, no dummy prefix) and spells any character outside
its vocabulary as UTF-8 byte pieces, so ``decode(encode_documents(text)) == text`` for every
string. Ids: UNK 0, BOS 1, EOS 2, PAD 3. ``load_tokenizer`` refuses any other set-up.

Which tokenizer goes with a model is checked in one place, ``check_tokenizer``: as many pieces as
the model's vocabulary and, where the dataset is known, the very model file its manifest recorded
(sha256). Every job (``data_prep``, ``pretrain.generate`` / ``eval`` / ``export``, ``zarvan_dist.hf``)
reads tokenizers through this module, so the same bad tokenizer gets the same message everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import sentencepiece as spm

if TYPE_CHECKING:
    from zarvan_dist.data.manifest import Manifest

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# sentencepiece turns every space into U+2581 and decodes U+2581 back to a space, so a literal
# U+2581 in the text would come back as a space; it is spelled as its UTF-8 byte pieces instead.
_META = "\u2581"


class TokenizerError(ValueError):
    """A tokenizer cannot be read, is not the lossless set-up, or does not fit a model or dataset."""


@dataclass(frozen=True)
class Tokenizer:
    """A sentencepiece model and where it came from."""

    processor: spm.SentencePieceProcessor
    data: bytes = field(repr=False)
    """The model file's bytes (what an export ships, what the manifest's sha256 is of)."""
    url: str
    """Where it was read from (for messages)."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Pieces in the vocabulary, the special ids and the 256 byte pieces included."""
        return self.processor.get_piece_size()

    def encode_documents(self, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """``encode_documents`` with this model."""
        return encode_documents(self.processor, texts, dtype)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


def load_tokenizer(url: str) -> Tokenizer:
    """The model at fsspec URL ``url``, checked to be the lossless set-up (``tokenizer_from_bytes``)."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer {url} does not exist") from None
    except (OSError, ValueError, ImportError) as exc:  # ImportError: e.g. s3:// without s3fs
        raise TokenizerError(f"tokenizer {url}: cannot read it: {exc}") from None
    return tokenizer_from_bytes(data, url)


def tokenizer_from_bytes(data: bytes, url: str) -> Tokenizer:
    """A sentencepiece model from its bytes; refused unless it has the project's special ids and byte
    fallback (without it some text cannot be encoded)."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, TypeError) as exc:
        raise TokenizerError(f"tokenizer {url}: not a sentencepiece model ({' '.join(str(exc).split())})") from None
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
    if ids != (UNK_ID, BOS_ID, EOS_ID, PAD_ID):
        raise TokenizerError(f"tokenizer {url}: special ids (unk, bos, eos, pad) are {ids}, "
                             f"expected {(UNK_ID, BOS_ID, EOS_ID, PAD_ID)}")
    if not all(sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256)):
        raise TokenizerError(f"tokenizer {url}: the model has no byte fallback, so it cannot encode every text")
    return Tokenizer(sp, data, url)


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int, manifest: Manifest | None = None,
                    dataset: str | None = None) -> None:
    """Raise TokenizerError unless ``tokenizer`` fits a model of ``vocab_size`` ids and, when given, is the
    very model the dataset ``dataset`` (its ``manifest``) was encoded with (by sha256)."""
    if tokenizer.vocab_size != vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer.url} has {tokenizer.vocab_size} pieces, the model's vocab_size "
                             f"is {vocab_size}: not the run's tokenizer")
    if manifest is not None and tokenizer.sha256 != manifest.tokenizer.sha256:
        raise TokenizerError(f"tokenizer {tokenizer.url} (sha256 {tokenizer.sha256[:12]}...) is not the one the "
                             f"dataset {dataset} was encoded with (sha256 {manifest.tokenizer.sha256[:12]}...)")


def encode_documents(sp: spm.SentencePieceProcessor, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents, each led by BOS, in one batch call.

    Returns (tokens, lengths): tokens is the (sum(lengths),) concatenation in ``dtype``; lengths is
    the (len(texts),) int64 token count of each document, its BOS included.
    """
    arrays = sp.encode(texts, add_bos=True, num_threads=1, out_type="numpy")
    for i, text in enumerate(texts):
        if _META in text:
            arrays[i] = _encode_with_literal_meta(sp, text)
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    return np.concatenate(arrays, dtype=dtype, casting="unsafe"), lengths


def _encode_with_literal_meta(sp: spm.SentencePieceProcessor, text: str) -> np.ndarray:
    meta = [sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]
    ids = [BOS_ID]
    for k, part in enumerate(text.split(_META)):
        if k:
            ids += meta
        ids += sp.encode(part)
    return np.asarray(ids, dtype=np.int32)
