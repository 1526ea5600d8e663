"""Dataset mixtures (``data.sources``): rows dealt by weight, each row a lane of one source, per-source
figures, resume (killed, on another world size, reweighted) and the refusals at start-up."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from run_helpers import ROOT, SEQ_LEN, VOCAB, run_config
from test_distributed import (
    _assert_close_curves,
    _finish,
    _losses,
    _run,
    _start,
    _trace,
    _train_records,
    _val_records,
    _wait_for_step,
)
from token_data import random_documents, write_token_dataset
from pretrain.train import Trainer
from zarvan_dist.config import ConfigError
from zarvan_dist.data.mixture import MixtureLayout, deal_rows
from zarvan_dist.data.lanes import LaneLayout
from zarvan_dist.data.reader import WindowReader
from zarvan_dist.training.checkpoint import LATEST, checkpoint_name
from zarvan_dist.training.config import load_run_config

STEPS = 8
ROWS = 8
SECTIONS = dict(
    train={"steps": STEPS, "grad_accum": 2},
    optim={"lr": 1e-2, "warmup_steps": 2},
    checkpoint={"every": 2, "keep": 10},
    eval={"every": 4, "rows": 2, "steps": 2},
    logging={"every": 2, "peak_tflops": 0.1, "progress": False, "tensorboard": False},
)


# ---------------------------------------------------------------- dealing rows
def test_largest_remainder_deals_rows_in_proportion_and_says_when_rows_are_too_few():
    assert deal_rows([0.75, 0.25], 8, ["web", "code"]) == [6, 2]
    # quotas 10/3 = 3.33 each: the one row left over goes to the earlier source
    assert deal_rows([1, 1, 1], 10, "abc") == [4, 3, 3]
    # quotas 1.4, 2.1, 4.5 -> 1, 2, 4 and the last row to the largest remainder (0.5)
    assert deal_rows([2, 3, 6.43], 8, "abc") == [1, 2, 5]
    with pytest.raises(ValueError, match="source b .* gets no row"):
        deal_rows([0.95, 0.05], 8, "ab")
    with pytest.raises(ValueError, match="fewer than the 3 sources"):
        deal_rows([1, 1, 1], 2, "abc")


def test_the_mixture_layout_lays_sources_out_row_after_row_and_splits_ranks_evenly():
    layout = MixtureLayout((LaneLayout(60, 6), LaneLayout(20, 2)))
    assert layout.rows == 8 and layout.starts == [0, 6]
    assert layout.parts(layout.rank_rows(0, 2)) == [(0, range(0, 4))]
    assert layout.parts(layout.rank_rows(1, 2)) == [(0, range(4, 6)), (1, range(0, 2))]
    assert layout.source_of(range(4, 8)).tolist() == [0, 0, 1, 1]
    assert layout.epochs(25) == [2, 2] and layout.epochs(30) == [3, 3]
    with pytest.raises(ValueError, match="do not divide among 3 ranks"):
        layout.rank_rows(0, 3)


# ---------------------------------------------------------------- two small sources
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two datasets of one (stand-in) tokenizer and seq_len: "web" ~15x the windows of "code"."""
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(7)
    web, code = root / "web", root / "code"
    write_token_dataset(web, {"train": random_documents(rng, 60, VOCAB, 20, 160),
                              "val": random_documents(rng, 10, VOCAB, 20, 100)}, SEQ_LEN, VOCAB, 10)
    write_token_dataset(code, {"train": random_documents(rng, 4, VOCAB, 20, 160),
                               "val": random_documents(rng, 6, VOCAB, 20, 100)}, SEQ_LEN, VOCAB, 10)
    return web, code


def mixture_config(home: Path, web: Path, code: Path, **data) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    sources = [{"dir": str(web), "weight": 0.75, "name": "web"}, {"dir": str(code), "weight": 0.25, "name": "code"}]
    return run_config(home, web, **{**SECTIONS, "data": {"sources": sources, "rows": ROWS, "workers": 0, **data}})


def test_rows_read_their_own_sources_lanes_in_order(sources, tmp_path):
    web, code = sources
    trainer = Trainer(load_run_config(mixture_config(tmp_path, web, code), ["train.device=cpu"]))
    try:
        assert [lay.rows for lay in trainer.layout.layouts] == [6, 2]
        readers = {0: WindowReader(str(web)), 1: WindowReader(str(code))}
        batches = trainer.train_batches()
        lane = [trainer.layout.layouts[0].lane_len, trainer.layout.layouts[1].lane_len]
        for step in range(max(lane) + 2):  # past the end of the shorter source's lanes: it wraps on its own
            batch = next(batches)
            assert batch.rows.tolist() == list(range(ROWS))
            for row in range(ROWS):
                source, local = (0, row) if row < 6 else (1, row - 6)
                windows, resets = trainer.layout.layouts[source].windows(step, range(local, local + 1))
                assert batch.windows[row] == windows[0], (step, row)
                assert np.array_equal(batch.tokens[row].numpy(), next(readers[source].iter_windows("train", int(windows[0]))))
                assert bool(batch.reset[row]) == bool(resets[0])
                if step % lane[source] == 0:  # a lane (re)starts: the state resets, in its own source's epoch
                    assert batch.reset[row]
        batches.close()
    finally:
        trainer.lock.release()


def test_a_two_source_run_logs_each_sources_tokens_loss_epoch_and_validation(sources, tmp_path):
    web, code = sources
    config = mixture_config(tmp_path, web, code)
    out = _run(1, config, [], tmp_path)
    records = _train_records(tmp_path / "run")
    logged = [r for r in records if "tokens/web" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    for r in logged:
        micro = r["step"] * 2
        assert r["tokens/web"] == micro * 6 * SEQ_LEN and r["tokens/code"] == micro * 2 * SEQ_LEN
        assert r["tokens/web"] + r["tokens/code"] == r["tokens"]
        assert r["fraction/web"] == 0.75 and r["weight/web"] == 0.75 and r["fraction/code"] == 0.25
    for r in records:  # each step's loss is the mean of its rows: 6 of web's, 2 of code's
        assert r["loss"] == pytest.approx(0.75 * r["loss/web"] + 0.25 * r["loss/code"], rel=1e-5)
    val = _val_records(tmp_path / "run")
    assert [v["step"] for v in val] == [4, 8]
    for v in val:
        assert v["val_loss"] == pytest.approx(0.75 * v["val_loss/web"] + 0.25 * v["val_loss/code"], rel=1e-6)
    assert re.search(r"val loss [\d.]+, perplexity [\d.]+, web [\d.]+, code [\d.]+", out)
    # code's lanes are 3x shorter: its epoch count runs ahead of web's
    last = logged[-1]
    assert last["epoch/code"] > last["epoch/web"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_mixture_and_a_two_process_checkpoint_resumes_on_one(
        sources, tmp_path, engine):
    web, code = sources
    one = mixture_config(tmp_path / "one", web, code)
    _run(1, one, [f"engine={engine}"], tmp_path)
    two = mixture_config(tmp_path / "two", web, code)
    _run(2, two, [f"engine={engine}"], tmp_path)
    _assert_close_curves(_losses(two.parent / "run"), _losses(one.parent / "run"))
    # rank 1 holds web's rows 4-5 and code's rows 0-1: the same number of rows as rank 0
    rank1 = _trace(two.parent / "run", 1)
    assert {(Path(b["url"]).name, tuple(b["rows"])) for b in rank1} == {("web", (4, 5)), ("code", (0, 1))}
    # 2 -> 1 process: the checkpoint of step 4 goes on in one process with every lane and state
    again = mixture_config(tmp_path / "again", web, code)
    ckpts = again.parent / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    os.symlink(two.parent / "run" / "checkpoints" / checkpoint_name(4), ckpts / checkpoint_name(4))
    (ckpts / LATEST).write_text(checkpoint_name(4) + "\n")
    out = _run(1, again, [f"engine={engine}"], tmp_path)
    assert "step 4, micro-step 8" in out and "1 rank(s)" in out
    _assert_close_curves(_losses(again.parent / "run"), _losses(one.parent / "run", first=5))
    # the lanes and states go on as the two-process job's own did (stored by global row, whatever the world)
    final = checkpoint_name(STEPS)
    got, want = (load_file(d / "run" / "checkpoints" / final / "lanes.safetensors") for d in (again.parent, two.parent))
    for key in want:
        assert got[key].shape[0] == ROWS, key
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=key)


def test_sigkill_mid_run_then_resume_gives_the_losses_of_the_uninterrupted_run(sources, tmp_path):
    web, code = sources
    reference = mixture_config(tmp_path / "reference", web, code, workers=1)
    _run(1, reference, [], tmp_path)
    killed = mixture_config(tmp_path / "killed", web, code, workers=1)
    proc = _start(1, killed, [], tmp_path)
    _wait_for_step(proc, killed.parent / "run", 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    out = _run(1, killed, [], tmp_path)
    assert "resumed from" in out
    keys = ("loss", "loss/web", "loss/code", "grad_norm", "tokens")
    got = {r["step"]: {k: r[k] for k in keys} for r in _train_records(killed.parent / "run")}
    want = {r["step"]: {k: r[k] for k in keys} for r in _train_records(reference.parent / "run")}
    assert got == want  # bit-identical: every step's losses, gradient norm and tokens
    assert _val_records(killed.parent / "run")[-1] == _val_records(reference.parent / "run")[-1]


# ---------------------------------------------------------------- refusals
def start_error(config: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        trainer = Trainer(load_run_config(config, ["train.device=cpu", *overrides]))
        trainer.lock.release()
    return str(info.value)


def test_a_source_of_another_tokenizer_or_seq_len_stops_start_up_naming_it(sources, tmp_path):
    web, code = sources
    rng = np.random.default_rng(1)
    stream = {"train": random_documents(rng, 10, VOCAB, 20, 160), "val": random_documents(rng, 4, VOCAB, 20, 100)}
    other_tokenizer = tmp_path / "books"
    write_token_dataset(other_tokenizer, stream, SEQ_LEN, VOCAB, 10, tokenizer=b"another sentencepiece model")
    message = start_error(mixture_config(tmp_path / "a", web, other_tokenizer))
    assert message.startswith(f"data.sources[1] (code, {other_tokenizer}): tokenizer sha256 is ")
    other_len = tmp_path / "long"
    write_token_dataset(other_len, stream, 2 * SEQ_LEN, VOCAB, 10)
    message = start_error(mixture_config(tmp_path / "b", web, other_len))
    assert message == (f"data.sources[1] (code, {other_len}): seq_len is {2 * SEQ_LEN}, source web has {SEQ_LEN}; "
                       f"every source of a mixture must be written with one tokenizer and seq_len")


def test_a_weight_that_is_not_positive_or_rows_too_few_for_the_weights_stop_start_up(sources, tmp_path):
    web, code = sources
    config = mixture_config(tmp_path, web, code)
    for weight in ("0", "-1"):
        message = start_error(config, f"data.sources.1.weight={weight}")
        assert "data.sources[1].weight: source code has weight" in message and "must be positive" in message
    message = start_error(config, "data.rows=4", "data.sources.0.weight=0.9", "data.sources.1.weight=0.1")
    assert message.startswith("data.rows 4 is too small for the weights given: source code (weight 0.1 of 1) gets no row")
    message = start_error(config, "data.dir=/somewhere/else")
    assert "give data.dir (one dataset) or data.sources (a mixture), not both" in message


def test_a_resume_with_other_weights_is_refused_unless_asked_then_starts_new_lanes(sources, tmp_path):
    web, code = sources
    config = mixture_config(tmp_path, web, code)
    _run(1, config, ["train.steps=4"], tmp_path)
    proc = _start(1, config, ["data.sources.1.weight=0.5"], tmp_path)
    out, err = _finish(proc)
    assert proc.returncode == 1
    assert ("error: data.sources: the checkpoint" in err and "was trained on web" in err
            and "set checkpoint.resume_reweight: true (--resume-reweight)" in err), err
    out = _run(1, config, ["data.sources.1.weight=0.5", "checkpoint.resume_reweight=true"], tmp_path)
    assert "data.sources changed, new lanes from their start with fresh states" in out
    trainer_json = json.loads((tmp_path / "run" / "checkpoints" / checkpoint_name(STEPS) / "trainer.json").read_text())
    assert trainer_json["lanes_from"] == 8 and trainer_json["micro_step"] == 2 * STEPS
    assert [s["rows"] for s in trainer_json["sources"]] == [5, 3]  # 0.75 / 0.5 of 8 rows: 4.8 -> 5, 3.2 -> 3
    last = [r for r in _train_records(tmp_path / "run") if "tokens/web" in r][-1]
    assert last["tokens/code"] == (2 * STEPS - 8) * 3 * SEQ_LEN  # since the new lanes began


def test_the_example_mixture_config_trains(sources, tmp_path):
    web, code = sources
    example = yaml.safe_load((ROOT / "configs" / "mixture-example.yaml").read_text())
    example["run_dir"] = str(tmp_path / "run")
    example["model_file"] = str(ROOT / "configs" / example["model_file"])  # relative to the example's folder
    example["data"]["sources"][0]["dir"], example["data"]["sources"][1]["dir"] = str(web), str(code)
    example["model"] = {**example.get("model", {}), "d_model": 32, "n_layers": 1, "n_heads": 2}
    example["train"] = {**example.get("train", {}), "steps": 2, "device": "cpu"}
    example["eval"] = {**example.get("eval", {}), "every": 2, "rows": 2, "steps": 1}
    config = tmp_path / "example.yaml"
    config.write_text(yaml.safe_dump(example))
    _run(1, config, ["data.workers=0", "logging.tensorboard=false"], tmp_path)
    assert {"val_loss/web", "val_loss/code"} <= set(_val_records(tmp_path / "run")[-1])


def test_eval_reports_each_source_and_the_weighted_mean_or_one_source(sources, tmp_path, capsys):
    from pretrain.eval import main as evaluate

    web, code = sources
    config = mixture_config(tmp_path, web, code)
    _run(1, config, ["train.steps=2", "eval.every=0"], tmp_path)
    run = tmp_path / "run"
    assert evaluate(["--checkpoint", str(run), "--steps", "2", "--device", "cpu"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert set(both["sources"]) == {"web", "code"}
    assert both["loss"] == pytest.approx(0.75 * both["sources"]["web"]["loss"] + 0.25 * both["sources"]["code"]["loss"])
    # the trainer's own figures at its last step: the same lanes, the same windows
    last = _val_records(run)[-1]
    assert both["sources"]["code"]["loss"] == pytest.approx(last["val_loss/code"], rel=1e-6)
    assert evaluate(["--checkpoint", str(run), "--steps", "2", "--device", "cpu", "--source", "code"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["source"] == "code" and one["loss"] == both["sources"]["code"]["loss"]
    assert evaluate(["--checkpoint", str(run), "--device", "cpu", "--source", "books"]) == 1
    assert "error: --source books: the run's sources are web, code" in capsys.readouterr().err
