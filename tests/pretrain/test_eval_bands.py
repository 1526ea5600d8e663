"""``python -m pretrain.eval`` bands, ``--no-carry`` and ``--text``, against direct forwards of the model.

The expected figures come from the checkpoint's model run by hand: a whole lane or document in one
forward from a fresh state (or one forward per window for ``--no-carry``), float64 cross-entropy,
and document positions counted token by token from each BOS.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from data_prep.corpus import CorpusConfig
from data_prep.tokenizer import TokenizerConfig, train_tokenizer
from pretrain.eval import main, parse_band_edges
from pretrain.train import Trainer
from run_helpers import SEQ_LEN, run_config
from token_data import BOS, random_documents, write_token_dataset
from zarvan_dist.data import WindowReader
from zarvan_dist.training.checkpoint import open_checkpoint
from zarvan_dist.training.config import load_run_config

PIECES = 300
WORDS = "the of and a to in is you that it he was for on are as with his they at be this have from or".split()


def prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run trained 2 steps on random documents of a 300-id vocabulary, its dataset holding a real
    300-piece tokenizer (trained here on prose)."""
    tmp = tmp_path_factory.mktemp("bands")
    rng = random.Random(0)
    (tmp / "corpus").mkdir()
    for i in range(20):
        (tmp / "corpus" / f"{i}.txt").write_text(prose(rng, 200))
    data = tmp / "data"
    train_tokenizer(TokenizerConfig(out=str(tmp / "tokenizer.model"), vocab_size=PIECES, threads=1,
                                    corpus=CorpusConfig(inputs=[str(tmp / "corpus")])), progress=False)
    np_rng = np.random.default_rng(0)
    write_token_dataset(data, {"train": random_documents(np_rng, 30, PIECES, 20, 120),
                               "val": random_documents(np_rng, 10, PIECES, 20, 100)}, SEQ_LEN, PIECES, 10,
                        tokenizer=(tmp / "tokenizer.model").read_bytes())
    config = run_config(tmp, data, train={"steps": 2, "grad_accum": 1}, checkpoint={"every": 2, "keep": 1},
                        eval={"every": 2, "rows": 2, "steps": 0},
                        logging={"every": 2, "tensorboard": False, "progress": False})
    assert Trainer(load_run_config(config)).fit() == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def model(run):
    return open_checkpoint(run).load_model()


@pytest.fixture(scope="module")
def texts(run) -> list[Path]:
    """Three one-line documents of about 10, 45 and 90 tokens."""
    rng = random.Random(1)
    paths = []
    for i, words in enumerate((4, 20, 40)):
        path = run.parent / f"doc{i}.txt"
        path.write_text(prose(rng, words))
        paths.append(path)
    return paths


def evaluate(capsys, *args: str) -> dict:
    assert main(["--device", "cpu", *args]) == 0
    return json.loads(capsys.readouterr().out)


def losses_of(model, inputs: list[int], targets: list[int]) -> np.ndarray:
    """Per-target cross-entropy (float64) of one forward over ``inputs`` from a fresh state."""
    x = torch.tensor([inputs])
    with torch.no_grad():
        logits = model(x, model.init_state(1), x == BOS).logits[0].double()
    return -logits.log_softmax(-1)[torch.arange(len(targets)), torch.tensor(targets)].numpy()


def positions_of(inputs: list[int]) -> list[int | None]:
    """Each target's document position: the input's index since the last BOS, plus one; None before any BOS."""
    out, pos = [], None
    for token in inputs:
        pos = 0 if token == BOS else None if pos is None else pos + 1
        out.append(None if pos is None else pos + 1)
    return out


def expected_bands(losses: np.ndarray, positions: list[int | None], edges: list[int]) -> list[tuple]:
    """(from, to, tokens, mean loss) of each band up to the last with a target."""
    starts, ends = [0, *edges], [*edges, None]
    known = np.array([p is not None for p in positions])
    pos = np.array([-1 if p is None else p for p in positions])
    bands = []
    for lo, hi in zip(starts, ends):
        inside = known & (pos >= lo) & ((pos < hi) if hi is not None else True)
        bands.append((lo, hi, int(inside.sum()), float(losses[inside].mean()) if inside.any() else None))
    while bands and bands[-1][2] == 0:
        bands.pop()
    return bands


def assert_bands(result: dict, losses: np.ndarray, positions: list[int | None], edges: list[int]) -> None:
    got = [(b["from"], b["to"], b["tokens"], b["loss"]) for b in result["bands"]]
    want = expected_bands(losses, positions, edges)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert [g[3] for g in got] == pytest.approx([w[3] for w in want], rel=1e-5)
    assert result["tokens"] == len(losses)
    assert result["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)


@pytest.fixture(scope="module")
def encode(run):
    """A text file's token ids as the run's tokenizer gives them, led by BOS."""
    sp = spm.SentencePieceProcessor(model_file=str(run.parent / "data" / "tokenizer.model"))
    return lambda path: [BOS, *sp.encode(path.read_text())]


def test_split_bands_match_a_direct_forward_of_each_lane(run, model, capsys):
    edges = [8, 32, 64]
    result = evaluate(capsys, "--checkpoint", str(run), "--rows", "2", "--bands", "0,8,32,64")
    windows = [w.tolist() for w in WindowReader(str(run.parent / "data")).iter_windows("val")]
    lane_len = len(windows) // 2
    losses, positions, unknown = [], [], 0
    for lane in (windows[:lane_len], windows[lane_len:2 * lane_len]):
        stream = [t for w in lane for t in w[:-1]] + [lane[-1][-1]]
        losses.append(losses_of(model, stream[:-1], stream[1:]))
        positions += positions_of(stream[:-1])
        unknown += stream.index(BOS)  # the targets before the lane's first BOS
    losses = np.concatenate(losses)
    assert unknown > 0  # the second lane starts inside a document
    assert result["unknown_position"]["tokens"] == unknown
    assert result["unknown_position"]["loss"] == pytest.approx(
        float(losses[[p is None for p in positions]].mean()), rel=1e-5)
    assert_bands(result, losses, positions, edges)
    assert (result["split"], result["carry"], result["windows"]) == ("val", True, 2 * lane_len)


def test_the_table_goes_to_stderr(run, capsys):
    assert main(["--device", "cpu", "--checkpoint", str(run), "--bands", "8,32"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    lines = captured.err.splitlines()
    assert lines[0].split() == ["position", "tokens", "loss", "perplexity"]
    assert lines[1].split()[:3] == ["[0,", "8)", str(result["bands"][0]["tokens"])]
    assert lines[-1].split()[:3] == ["all", f"{result['tokens']:,}", f"{result['loss']:.4f}"]


def test_no_carry_on_a_split_equals_the_trainer_resetting_every_window(run, capsys):
    carried = evaluate(capsys, "--checkpoint", str(run))
    fresh = evaluate(capsys, "--checkpoint", str(run), "--no-carry")
    checkpoint = open_checkpoint(run).path
    trainer = Trainer(load_run_config(checkpoint / "config.yaml", ["train.carry_state=false", "train.device=cpu",
                                                                   f"checkpoint.init_from={checkpoint}"]))
    (reference,) = trainer.evaluate().values()  # the one dataset's figures
    assert fresh["carry"] is False
    assert fresh["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert abs(fresh["loss"] - carried["loss"]) > 1e-4
    assert fresh["unknown_position"]["tokens"] == carried["unknown_position"]["tokens"]  # positions still counted


def test_a_run_evaluates_after_the_checkpoint_it_started_from_is_gone(run, tmp_path, capsys):
    """Evaluation reads the weights of the run's own checkpoint, never checkpoint.init_from again."""
    origin = tmp_path / "origin"
    shutil.copytree(open_checkpoint(run).path, origin)
    config = load_run_config(origin / "config.yaml", [f"run_dir={tmp_path / 'child'}", f"checkpoint.init_from={origin}",
                                                   "train.steps=1", "checkpoint.every=1", "eval.every=0"])
    assert Trainer(config).fit() == 0
    shutil.rmtree(origin)
    capsys.readouterr()
    result = evaluate(capsys, "--checkpoint", str(tmp_path / "child"))
    assert result["step"] == 1 and result["tokens"] > 0


def test_text_bands_match_a_direct_forward_of_each_document(run, model, texts, encode, capsys):
    edges = [4, 16, 32]
    result = evaluate(capsys, "--checkpoint", str(run), "--text", *map(str, texts), "--seq-len", "8",
                      "--rows", "2", "--bands", "4,16,32")
    docs = list(map(encode, texts))
    assert 5 < len(docs[0]) < 16 < 32 < len(docs[2])  # one window, several, a band past 32
    losses = np.concatenate([losses_of(model, d[:-1], d[1:]) for d in docs])
    positions = [p for d in docs for p in positions_of(d[:-1])]
    assert_bands(result, losses, positions, edges)
    assert (result["split"], result["documents"], result["seq_len"], result["carry"]) == (None, 3, 8, True)
    assert result["text"] == list(map(str, texts))
    assert result["windows"] == sum(-(-(len(d) - 1) // 8) for d in docs)
    assert "unknown_position" not in result


def test_no_carry_on_text_equals_a_fresh_state_per_window(run, model, texts, encode, capsys):
    args = ["--checkpoint", str(run), "--text", *map(str, texts), "--seq-len", "8", "--bands", "4,16,32",
            "--tokenizer", str(run.parent / "data" / "tokenizer.model")]
    carried = evaluate(capsys, *args)
    fresh = evaluate(capsys, *args, "--no-carry")
    losses, positions = [], []
    for d in map(encode, texts):
        for k in range(0, len(d) - 1, 8):  # window k: inputs d[k:k+8], targets one token on
            n = min(8, len(d) - 1 - k)
            losses.append(losses_of(model, d[k:k + n], d[k + 1:k + 1 + n]))
        positions += positions_of(d[:-1])
    losses = np.concatenate(losses)
    assert_bands(fresh, losses, positions, [4, 16, 32])
    assert fresh["carry"] is False
    assert abs(fresh["loss"] - carried["loss"]) > 1e-4


@pytest.mark.parametrize("name, words", [("missing.txt", ["no such file or directory"]),
                                         ("empty.txt", ["no text to evaluate", "1 empty"])])
def test_a_missing_or_empty_text_file_is_a_one_line_error(run, texts, tmp_path, capsys, name, words):
    bad = tmp_path / name
    if name == "empty.txt":
        bad.write_text("")
    assert main(["--device", "cpu", "--checkpoint", str(run), "--text", str(texts[0]), str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --text: input ")
    for word in [name, *words]:
        assert word in lines[0]


def test_a_tokenizer_that_does_not_fit_the_model_is_an_error(run, texts, tmp_path, capsys):
    bigger = tmp_path / "big.model"
    train_tokenizer(TokenizerConfig(out=str(bigger), vocab_size=PIECES + 40, threads=1,
                                    corpus=CorpusConfig(inputs=[str(run.parent / "corpus")])), progress=False)
    assert main(["--device", "cpu", "--checkpoint", str(run), "--text", str(texts[0]), "--tokenizer", str(bigger)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: tokenizer {bigger} has {PIECES + 40} pieces, the model's vocab_size is {PIECES}: not the run's tokenizer"


def test_another_tokenizer_of_the_same_size_is_an_error(run, texts, tmp_path, capsys):
    """A tokenizer with the model's vocabulary size that is not the dataset's would give a wrong perplexity."""
    rng = random.Random(7)
    (tmp_path / "corpus").mkdir()
    for i in range(20):
        (tmp_path / "corpus" / f"{i}.txt").write_text(prose(rng, 200).upper())
    other = tmp_path / "other.model"
    train_tokenizer(TokenizerConfig(out=str(other), vocab_size=PIECES, threads=1,
                                    corpus=CorpusConfig(inputs=[str(tmp_path / "corpus")])), progress=False)
    assert main(["--device", "cpu", "--checkpoint", str(run), "--text", str(texts[0]), "--tokenizer", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: tokenizer {other} (sha256 ") and f"is not the one the dataset {run.parent / 'data'} was" in err


def test_band_edges_parse():
    assert parse_band_edges("128,512,2k,8K,1M") == [128, 512, 2048, 8192, 1 << 20]
    assert parse_band_edges("0,16") == [16]
    for bad in ("512,128", "0", "a,b", "16,16", "-4,8"):
        with pytest.raises(Exception, match="expected"):
            parse_band_edges(bad)


def test_text_options_need_text_and_split_options_refuse_it(run, texts, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(run), "--seq-len", "8"])
    assert exit_.value.code == 2 and "--tokenizer and --seq-len go with --text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(run), "--text", str(texts[0]), "--split", "train"])
    assert exit_.value.code == 2 and "--split: a split's option, not for --text" in capsys.readouterr().err
