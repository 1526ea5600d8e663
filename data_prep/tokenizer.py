"""The ``tokenizer`` job: train a lossless sentencepiece model on a seeded sample of the corpus.

The set-up (identity normalisation, whitespace kept, byte fallback, ids UNK 0, BOS 1, EOS 2, PAD 3)
is the one ``zarvan_dist.tokenizer`` loads and checks; loading and encoding live there.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import sentencepiece as spm

from data_prep import DataPrepError
from data_prep.corpus import CorpusConfig, sample_documents
from data_prep.storage import filesystem, put_atomic
from zarvan_dist.config import ConfigError
from zarvan_dist.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, encode_documents, tokenizer_from_bytes

# sentencepiece skips training sentences longer than max_sentence_length bytes; documents are cut
# into pieces of at most this size for training so that none is dropped.
TRAIN_PIECE_BYTES = 4096
# A trained model must give back this many sampled documents exactly before it is written.
_CHECKED_DOCS = 64
# sentencepiece's trained model depends on its thread count, so the default is a fixed number
# rather than the machine's core count: the same command gives the same model everywhere.
TRAIN_THREADS = 16


@dataclass
class TokenizerConfig:
    """Settings of the ``tokenizer`` job."""

    out: str
    """fsspec URL the model file is written to (``.../tokenizer.model``)."""
    vocab_size: int
    """Pieces in the vocabulary, the 4 special ids and 256 byte pieces included."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Documents to sample the training text from."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """sentencepiece algorithm."""
    seed: int = 0
    """Seed of the document sample (and of sentencepiece's own sampling)."""
    sample_bytes: int = 100_000_000
    """UTF-8 bytes of text to train on: whole documents of smallest seeded key until this is reached."""
    threads: int = TRAIN_THREADS
    """Training threads; the model depends on this number, not on the machine's cores."""

    def __post_init__(self) -> None:
        if self.vocab_size <= 256 + 4:
            raise ConfigError(f"vocab_size: {self.vocab_size} leaves no room beyond the 256 byte pieces and 4 special ids")
        if self.sample_bytes < 1:
            raise ConfigError(f"sample_bytes: expected a positive integer, got {self.sample_bytes}")
        if self.seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {self.seed}")
        if self.threads < 1:
            raise ConfigError(f"threads: expected a positive integer, got {self.threads}")


def training_pieces(texts: list[str], limit: int = TRAIN_PIECE_BYTES) -> Iterator[str]:
    """The texts cut for training: whole lines (newlines kept) grouped up to ``limit`` UTF-8 bytes.

    A line longer than ``limit`` is cut every ``limit // 4`` characters (a character is at most 4
    bytes), so every piece fits and all text reaches the trainer.
    """
    for text in texts:
        group, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size + n > limit and group:
                yield "".join(group)
                group, size = [], 0
            if n > limit:
                step = limit // 4
                yield from (line[i:i + step] for i in range(0, len(line), step))
                continue
            group.append(line)
            size += n
        if group:
            yield "".join(group)


def train_tokenizer(cfg: TokenizerConfig, progress: bool = True) -> dict:
    """Train a sentencepiece model on a seeded sample of the corpus and write it to ``cfg.out``.

    The sample (``sample_documents``) streams over the whole corpus and holds about ``cfg.sample_bytes``.

    Returns a summary: documents read and sampled, sample bytes, vocabulary size, seconds.
    """
    start = time.perf_counter()
    sample, stats = sample_documents(cfg.corpus, cfg.sample_bytes, cfg.seed, progress)
    if not sample:
        raise DataPrepError(f"no documents to train on ({stats.description}; skipped: {stats.skipped})")
    size = sum(len(text.encode("utf-8")) for text in sample)
    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_pieces(sample),
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=TRAIN_PIECE_BYTES,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            num_threads=cfg.threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataPrepError(
            f"sentencepiece could not train a {cfg.model_type} model of vocab size {cfg.vocab_size} "
            f"on {size} bytes: {exc}"
        ) from None
    tokenizer = tokenizer_from_bytes(model.getvalue(), cfg.out)
    sp = tokenizer.processor
    for text in sample[:_CHECKED_DOCS]:
        if sp.decode(encode_documents(sp, [text], "uint32")[0].tolist()) != text:
            raise DataPrepError(f"the trained model does not reproduce a sampled document; not writing {cfg.out}")
    put_atomic(*filesystem(cfg.out), tokenizer.data)
    return {
        "out": cfg.out,
        "sha256": tokenizer.sha256,
        "corpus": stats,
        "sample_documents": len(sample),
        "sample_bytes": size,
        "vocab_size": sp.get_piece_size(),
        "model_type": cfg.model_type,
        "seconds": time.perf_counter() - start,
    }
