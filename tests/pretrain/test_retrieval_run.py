"""Training with retrieval (``data.neighbours``): the model is fed each window's neighbours in training and
evaluation, a stopped and resumed run equals an uninterrupted one, and a sidecar the run cannot use is refused."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.eval import main as eval_main
from pretrain.train import Trainer
from pretrain.train import main as train_main
from run_helpers import SEQ_LEN, VOCAB, run_config, start_trainer
from test_resume import DETERMINISTIC, _assert_same_checkpoint, _metrics
from token_data import random_documents, write_neighbour_sidecar, write_token_dataset
from zarvan_dist.config import ConfigError
from zarvan_dist.data import WindowReader
from zarvan_dist.models.nonattn import NonAttnLM
from zarvan_dist.training.checkpoint import checkpoint_name
from zarvan_dist.training.config import load_run_config

CHUNK, K, NEIGHBOUR_LEN = 4, 2, 6
MODEL = {"arch": "nonattn", "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "conv_kernel": 4,
         "dilations": [1, 2], "supervisor_chunk": CHUNK, "retrieval": True, "retrieval_len": NEIGHBOUR_LEN}
STEPS, STOP = 8, 4
TIMEOUT = 120


@pytest.fixture(scope="module")
def sidecar(token_dataset, tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The neighbour sidecar of ``token_dataset`` and what it holds (split -> ids, distances)."""
    root = tmp_path_factory.mktemp("sidecar") / "neighbours"
    return root, write_neighbour_sidecar(root, token_dataset, CHUNK, K, NEIGHBOUR_LEN)


def _config(home: Path, data_dir: Path, neighbours: Path | None, **sections) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    base = dict(model=MODEL, data={"neighbours": str(neighbours) if neighbours else None},
                train={"steps": 3, "grad_accum": 1}, eval={"every": 3, "rows": 2, "steps": 2},
                logging={"every": 3, "progress": False, "tensorboard": False})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return run_config(home, data_dir, **base)


def test_the_model_is_fed_the_neighbours_of_each_window_in_training_and_evaluation(token_dataset, sidecar,
                                                                                   tmp_path, monkeypatch):
    root, written = sidecar
    reader = WindowReader(str(token_dataset))
    windows = {split: np.stack([reader.read(split, w)[:-1] for w in range(len(written[split][0]))]).astype(np.int64)
               for split in ("train", "val")}
    seen: list[tuple[bool, torch.Tensor, torch.Tensor | None]] = []
    forward = NonAttnLM.forward

    def recording(self, input_ids, state=None, doc_start=None, neighbours=None):
        seen.append((self.training, input_ids.clone(), None if neighbours is None else neighbours.clone()))
        return forward(self, input_ids, state, doc_start, neighbours)

    monkeypatch.setattr(NonAttnLM, "forward", recording)
    assert Trainer(load_run_config(_config(tmp_path, token_dataset, root))).fit() == 0
    assert [training for training, _, _ in seen] == [True] * 3 + [False] * 2  # 3 steps, then 2 eval micro-steps
    for training, inputs, neighbours in seen:
        split = "train" if training else "val"
        assert neighbours is not None and neighbours.dtype == torch.int64
        assert neighbours.shape == (len(inputs), SEQ_LEN // CHUNK, K, NEIGHBOUR_LEN)
        for row, tokens in zip(inputs.numpy(), neighbours.numpy()):
            window = np.flatnonzero((windows[split] == row).all(1))
            assert len(window) == 1  # random tokens: each window's inputs are unique
            np.testing.assert_array_equal(tokens, written[split][0][window[0]])


@pytest.fixture(scope="module")
def resumed_and_reference(token_dataset, sidecar, tmp_path_factory) -> tuple[Path, Path, str]:
    """With DataLoader workers and dropout: a run stopped at the checkpoint of step STOP and resumed by
    ``python -m pretrain``, and the same run never stopped (trained here while the other resumes).
    Returns their run dirs and the resumed run's stdout."""
    tmp = tmp_path_factory.mktemp("retrieval_resume")
    # a constant schedule, so that the STOP-step run continued to STEPS steps is the STEPS-step run
    sections = dict(model={"dropout": 0.1}, data={"workers": 2, "prefetch": 2},
                    train={"steps": STEPS, "grad_accum": 2}, optim={"schedule": "constant"},
                    checkpoint={"every": 2, "keep": 2}, eval={"every": STOP})
    resumed, reference = (_config(tmp / name, token_dataset, sidecar[0], **sections)
                          for name in ("resumed", "reference"))
    assert Trainer(load_run_config(resumed, [f"train.steps={STOP}"])).fit() == 0
    proc = start_trainer(resumed, tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert Trainer(load_run_config(reference)).fit() == 0
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"{out}\n{err}"
    return resumed.parent / "run", reference.parent / "run", out


def test_a_stopped_and_resumed_retrieval_run_equals_the_uninterrupted_one(resumed_and_reference):
    run_dir, ref_dir, out = resumed_and_reference
    resumed = re.search(r"resumed from (\S+): step (\d+),", out)
    assert resumed and (Path(resumed[1]), int(resumed[2])) == (run_dir / "checkpoints" / checkpoint_name(STOP), STOP)
    (train, val), (ref_train, ref_val) = _metrics(run_dir), _metrics(ref_dir)
    assert [r["step"] for r in train] == [r["step"] for r in ref_train] == list(range(1, STEPS + 1))
    for got, want in zip(train, ref_train):
        assert {k: got[k] for k in DETERMINISTIC} == {k: want[k] for k in DETERMINISTIC}, f"step {got['step']}"
    assert [r["step"] for r in val] == [STOP, STEPS] and val == ref_val
    final = checkpoint_name(STEPS)
    _assert_same_checkpoint(run_dir / "checkpoints" / final, ref_dir / "checkpoints" / final)


def test_eval_of_a_checkpoint_reads_the_runs_neighbours_unless_told_otherwise(resumed_and_reference, sidecar,
                                                                              capsys):
    run_dir = resumed_and_reference[0]
    last_val = _metrics(run_dir)[1][-1]
    assert eval_main(["--checkpoint", str(run_dir), "--steps", "2"]) == 0
    with_neighbours = json.loads(capsys.readouterr().out)
    assert with_neighbours["loss"] == pytest.approx(last_val["val_loss"], rel=1e-6)
    assert eval_main(["--checkpoint", str(run_dir), "--steps", "2", "--neighbours", str(sidecar[0])]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == with_neighbours["loss"]
    assert eval_main(["--checkpoint", str(run_dir), "--steps", "2", "--neighbours", "none"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["loss"] != pytest.approx(with_neighbours["loss"], rel=1e-6)
    assert "it evaluates without retrieved text" in captured.err


@pytest.mark.parametrize("override, words", [
    ("model.retrieval_len=4", ["model.retrieval_len: 4", f"neighbour_len {NEIGHBOUR_LEN}"]),
    ("model.supervisor_chunk=8", ["model.supervisor_chunk: 8", f"chunk_len {CHUNK}"]),
    ("model.retrieval=false", ["data.neighbours", "retrieval: false", "model.retrieval: true"]),
    ("model.arch=zarvan", ["data.neighbours", "arch zarvan", "model.arch: nonattn"]),
])
def test_a_sidecar_the_model_cannot_read_is_refused_naming_the_keys(token_dataset, sidecar, tmp_path, capsys,
                                                                   override, words):
    config = _config(tmp_path, token_dataset, sidecar[0])
    with pytest.raises(ConfigError) as caught:
        Trainer(load_run_config(config, [override]))
    for word in words:
        assert word in str(caught.value)
    # the command line prints it as one error line and exits 1
    assert train_main(["--config", str(config), "--set", override]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words[0] in err


def test_a_sidecar_of_another_dataset_or_window_length_is_refused(token_dataset, sidecar, tmp_path):
    rng = np.random.default_rng(2)
    for name, seq_len, want in (("other", SEQ_LEN, "belong to"), ("shorter", SEQ_LEN // 2, "seq_len")):
        other = tmp_path / name
        write_token_dataset(other, {"train": random_documents(rng, 20, VOCAB, 20, 100),
                                    "val": random_documents(rng, 4, VOCAB, 20, 100)}, seq_len, VOCAB, 10)
        config = _config(tmp_path / f"{name}-run", other, sidecar[0])
        with pytest.raises(ConfigError, match=want) as caught:
            Trainer(load_run_config(config))
        assert str(caught.value).startswith("data.neighbours: ") and str(other) in str(caught.value)


def test_a_retrieval_model_without_neighbours_says_so(token_dataset, tmp_path, capsys):
    Trainer(load_run_config(_config(tmp_path, token_dataset, None)))
    assert "note: model.retrieval is true but data.neighbours is unset" in capsys.readouterr().err
