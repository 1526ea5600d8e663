"""The tokenizer job: lossless on any text, nothing dropped from training, the CLI of the issue."""

from __future__ import annotations

import hashlib

import pytest
import sentencepiece as spm

from data_prep import DataPrepError
from data_prep.__main__ import main
from data_prep.corpus import CorpusConfig
from data_prep.tokenizer import TRAIN_PIECE_BYTES, TokenizerConfig, train_tokenizer, training_pieces
from zarvan_dist.config import ConfigError
from zarvan_dist.tokenizer import TokenizerError, encode_documents, load_tokenizer

TRICKY = [
    "plain prose. Two  spaces, trailing   ",
    "  leading spaces and\r\nCRLF\r\n\r\n",
    "\tdef f():\n\t\treturn 1\n\n\n",
    "emoji \U0001F600\U0001F389 ZWJ \U0001F468\u200d\U0001F469 flags \U0001F1EB\U0001F1F7",
    "\u2581 literal meta \u2581\u2581 and a space \u2581 ",
    "<s></s><unk><pad> look like specials",
    "\x00\x01\x7f control bytes and \u00a0nbsp \u3000 ideographic space",
    "e\u0301 combining, \ufffd replacement, \U0010FFFF last code point",
    "\u4e2d\u6587\u65e5\u672c\u8a9e\ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    " ",
    "\n",
]


def test_decode_of_encode_is_identity(tokenizer_path):
    sp = load_tokenizer(tokenizer_path).processor
    tokens, lengths = encode_documents(sp, TRICKY, "uint16")
    assert lengths.sum() == len(tokens)
    start = 0
    for text, n in zip(TRICKY, lengths):
        ids = tokens[start:start + n].tolist()
        start += n
        assert ids[0] == sp.bos_id()
        assert sp.decode(ids) == text
        assert sp.unk_id() not in ids


def test_special_ids(tokenizer_path):
    sp = load_tokenizer(tokenizer_path).processor
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == 400


def test_training_pieces_fit_the_sentence_limit_and_lose_nothing():
    text = "short line\n" + "\U0001F600" * 3000 + "\n" + "y" * 9000 + "\nend"
    pieces = list(training_pieces([text]))
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= TRAIN_PIECE_BYTES for p in pieces)


def test_document_longer_than_the_sentence_limit_is_trained_on(tmp_path):
    """One document, one 30 KB line: sentencepiece alone would skip it and learn nothing."""
    (tmp_path / "long.txt").write_text("zebraquux " * 3000)
    (tmp_path / "other.txt").write_text("a b c\n")
    out = tmp_path / "t.model"
    train_tokenizer(TokenizerConfig(out=str(out), vocab_size=280, corpus=CorpusConfig(inputs=[str(tmp_path)])),
                    progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert {"zebraquux", "\u2581zebraquux"} & pieces


def test_unigram_is_selectable_and_lossless(tmp_path, corpus_dir):
    out = tmp_path / "u.model"
    summary = train_tokenizer(TokenizerConfig(out=str(out), vocab_size=400, model_type="unigram",
                                              corpus=CorpusConfig(inputs=[str(corpus_dir)])), progress=False)
    assert summary["model_type"] == "unigram"
    sp = load_tokenizer(str(out)).processor
    tokens, _ = encode_documents(sp, TRICKY[:5], "uint16")
    assert sp.decode(tokens.tolist()) == "".join(TRICKY[:5])


def test_cli_is_deterministic_and_writes_through_fsspec(tmp_path, corpus_dir, memory_root):
    local = tmp_path / "tokenizer.model"
    assert main(["tokenizer", "--input", str(corpus_dir), "--vocab-size", "400", "--out", str(local), "--quiet"]) == 0
    remote = f"{memory_root}/tokenizer.model"
    assert main(["tokenizer", "--input", str(corpus_dir), "--vocab-size", "400", "--out", remote, "--quiet"]) == 0
    data = load_tokenizer(remote).data
    assert hashlib.sha256(data).digest() == hashlib.sha256(local.read_bytes()).digest()


def test_model_without_byte_fallback_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text("".join(f"some words {i} to train on, {i * 7}\n" for i in range(300)))
    prefix = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=prefix, vocab_size=30,
                                   bos_id=1, eos_id=2, pad_id=3, unk_id=0, minloglevel=2)
    with pytest.raises(TokenizerError, match=r"plain\.model: the model has no byte fallback"):
        load_tokenizer(prefix + ".model")


def test_vocab_size_out_of_reach_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size: 200 leaves no room"):
        TokenizerConfig(out=str(tmp_path / "t.model"), vocab_size=200)
    (tmp_path / "c.txt").write_text("tiny corpus\n")
    cfg = TokenizerConfig(out=str(tmp_path / "t.model"), vocab_size=5000, corpus=CorpusConfig(inputs=[str(tmp_path)]))
    with pytest.raises(DataPrepError, match="could not train a bpe model of vocab size 5000.*Vocabulary size too high"):
        train_tokenizer(cfg, progress=False)
    assert not (tmp_path / "t.model").exists()


def test_sample_is_seeded_and_independent_of_input_order(tmp_path, corpus_dir):
    """A part of the corpus, about sample_bytes, chosen by the seed: the same model whatever the input order."""
    prose, code = str(corpus_dir / "prose"), str(corpus_dir / "code")
    orders = ([prose, code], [code, prose])
    summaries = [train_tokenizer(TokenizerConfig(out=str(tmp_path / f"{i}.model"), vocab_size=400, sample_bytes=20_000,
                                                 corpus=CorpusConfig(inputs=inputs)), progress=False)
                 for i, inputs in enumerate(orders)]
    assert summaries[0]["sha256"] == summaries[1]["sha256"]
    s = summaries[0]
    assert 20_000 <= s["sample_bytes"] < 25_000 and s["sample_documents"] < s["corpus"].documents == 80
