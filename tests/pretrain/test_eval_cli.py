"""``python -m pretrain.eval``: any split of a checkpoint, the same figures the trainer logs."""

from __future__ import annotations

import json

import pytest

from pretrain.eval import main
from pretrain.train import Trainer
from run_helpers import SEQ_LEN, run_config
from zarvan_dist.training.config import load_run_config


@pytest.fixture(scope="module")
def trained_run(token_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    config = run_config(tmp, token_dataset, train={"steps": 6, "grad_accum": 1},
                        checkpoint={"every": 3, "keep": 3}, eval={"every": 3, "rows": 2, "steps": 0},
                        logging={"every": 3, "tensorboard": False, "progress": False})
    assert Trainer(load_run_config(config)).fit() == 0
    return tmp / "run"


def test_val_loss_equals_the_trainers_last_evaluation(trained_run, capsys):
    assert main(["--checkpoint", str(trained_run)]) == 0  # the run dir: its latest checkpoint
    result = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in records if "val_loss" in r][-1]
    assert result["step"] == last_val["step"] == 6
    assert result["split"] == "val"
    assert result["loss"] == pytest.approx(last_val["val_loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(last_val["val_perplexity"], rel=1e-6)
    assert result["tokens"] == result["windows"] * SEQ_LEN


def test_any_split_and_checkpoint(trained_run, capsys):
    ckpt = trained_run / "checkpoints" / "step-00000003"
    assert main(["--checkpoint", str(ckpt), "--split", "train", "--rows", "4", "--steps", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["step"], result["split"], result["windows"], result["tokens"]) == (3, "train", 20, 20 * SEQ_LEN)
    assert 0 < result["loss"] < 10


def test_a_path_that_is_no_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path)]) == 1
    assert f"error: {tmp_path}: not a checkpoint directory" in capsys.readouterr().err


def test_bands_and_unknown_positions_account_for_every_target(trained_run, capsys):
    assert main(["--checkpoint", str(trained_run), "--bands", "16,64"]) == 0
    result = json.loads(capsys.readouterr().out)
    bands, unknown = result["bands"], result["unknown_position"]
    assert result["carry"] is True
    assert [(b["from"], b["to"]) for b in bands] == [(0, 16), (16, 64), (64, None)]
    assert sum(b["tokens"] for b in bands) + unknown["tokens"] == result["tokens"]
    assert sum(b["loss"] * b["tokens"] for b in bands) + unknown["loss"] * unknown["tokens"] == \
        pytest.approx(result["loss"] * result["tokens"], rel=1e-9)


def test_text_with_a_file_that_is_no_tokenizer_is_a_clear_error(trained_run, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("some text\n")
    assert main(["--checkpoint", str(trained_run), "--text", str(text)]) == 1  # the synthetic dataset's tokenizer
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "tokenizer.model: not a sentencepiece model" in err
