"""The same bad tokenizer is the same one-line error, exit status 1, in every job that reads one:
``pretrain.generate``, ``pretrain.eval --text``, ``pretrain.export --format hf``, and the transformers
tokenizer of an export (``zarvan_dist.hf``) raises it too."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.corpus import CorpusConfig
from data_prep.tokenizer import TokenizerConfig, train_tokenizer
from pretrain.eval import main as eval_main
from pretrain.export import main as export_main
from pretrain.generate import main as generate_main
from pretrain.train import Trainer
from run_helpers import SEQ_LEN, run_config
from token_data import random_documents, write_token_dataset
from zarvan_dist.tokenizer import TokenizerError
from zarvan_dist.training.config import load_run_config

PIECES = 300
WORDS = "the of and a to in is you that it he was for on are as with his they at be this have from or".split()


def train(out: Path, corpus: Path, pieces: int) -> Path:
    rng = np.random.default_rng(pieces)
    corpus.mkdir(exist_ok=True)
    for i in range(20):
        (corpus / f"{i}.txt").write_text(" ".join(rng.choice(WORDS, 200)) + ".\n")
    train_tokenizer(TokenizerConfig(out=str(out), vocab_size=pieces, threads=1,
                                    corpus=CorpusConfig(inputs=[str(corpus)])), progress=False)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run of one step whose dataset holds a real 300-piece tokenizer."""
    tmp = tmp_path_factory.mktemp("tokenizer_errors")
    tokenizer = train(tmp / "tokenizer.model", tmp / "corpus", PIECES)
    rng = np.random.default_rng(0)
    write_token_dataset(tmp / "data", {"train": random_documents(rng, 20, PIECES, 20, 80),
                                       "val": random_documents(rng, 4, PIECES, 20, 40)}, SEQ_LEN, PIECES, 10,
                        tokenizer=tokenizer.read_bytes())
    config = run_config(tmp, tmp / "data", model={"vocab_size": PIECES}, train={"steps": 1, "grad_accum": 1},
                        checkpoint={"every": 1, "keep": 1}, eval={"every": 0, "rows": 2, "steps": 1},
                        logging={"every": 1, "tensorboard": False, "progress": False})
    assert Trainer(load_run_config(config)).fit() == 0
    (tmp / "doc.txt").write_text("the cat sat on the mat.\n")
    return tmp / "run"


@pytest.fixture(scope="module")
def bad_tokenizers(run) -> dict[str, tuple[Path, str]]:
    """Each bad tokenizer and the message every job must give for it."""
    garbage = run.parent / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    wide = train(run.parent / "wide.model", run.parent / "corpus", PIECES + 40)
    return {
        "not sentencepiece": (garbage, f"tokenizer {garbage}: not a sentencepiece model ("),
        "another vocabulary": (wide, f"tokenizer {wide} has {PIECES + 40} pieces, the model's vocab_size is "
                                     f"{PIECES}: not the run's tokenizer"),
        "missing": (run.parent / "missing.model", f"tokenizer {run.parent / 'missing.model'} does not exist"),
    }


JOBS = {
    "generate": lambda run, tok, tmp: generate_main(["--checkpoint", str(run), "--tokenizer", str(tok), "--device",
                                                     "cpu", "--prompt", "the cat", "--max-new-tokens", "2"]),
    "eval": lambda run, tok, tmp: eval_main(["--checkpoint", str(run), "--tokenizer", str(tok), "--device", "cpu",
                                             "--text", str(run.parent / "doc.txt")]),
    "export --format hf": lambda run, tok, tmp: export_main([str(run), str(tmp / "hf"), "--format", "hf",
                                                             "--tokenizer", str(tok)]),
}


@pytest.mark.parametrize("bad", ["not sentencepiece", "another vocabulary", "missing"])
@pytest.mark.parametrize("job", list(JOBS))
def test_every_job_gives_the_same_error_for_a_bad_tokenizer(job, bad, run, bad_tokenizers, tmp_path, capsys):
    if job == "export --format hf":
        pytest.importorskip("transformers")
    tokenizer, message = bad_tokenizers[bad]
    assert JOBS[job](run, tokenizer, tmp_path) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), captured.err
    assert list(tmp_path.iterdir()) == []  # no export left behind


def test_the_transformers_tokenizer_of_an_export_raises_the_same_error(run, bad_tokenizers, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from zarvan_dist.hf import register

    register()
    assert export_main([str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    garbage, message = bad_tokenizers["not sentencepiece"]
    shutil.copy(garbage, tmp_path / "hf" / "tokenizer.model")
    with pytest.raises(TokenizerError) as error:
        AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert str(error.value).startswith(message.replace(str(garbage), str(tmp_path / "hf" / "tokenizer.model")))
