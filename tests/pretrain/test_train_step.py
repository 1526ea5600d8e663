"""One optimizer step: a NaN loss is skipped and counted, repeated NaNs stop the run with a message;
activation checkpointing, bfloat16 autocast and torch.compile train the same model; carry_state
false really resets the state; grad_accum consumes consecutive windows of the same lanes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain.train as train_module
from pretrain.train import Trainer, TrainingError, main
from run_helpers import ROOT, SEQ_LEN, VOCAB, run_config, trainer_env
from zarvan_dist.data.lanes import LaneLayout
from zarvan_dist.training.config import load_run_config

QUIET = {"every": 1, "tensorboard": False, "progress": False}


def _trainer(tmp_path: Path, data_dir: Path, name: str, **sections) -> Trainer:
    home = tmp_path / name
    home.mkdir()
    return Trainer(load_run_config(run_config(home, data_dir, **sections)))


def _records(trainer: Trainer) -> tuple[list[dict], list[dict]]:
    """(per-step records, evaluation records) of the trainer's metrics.jsonl."""
    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


def _nan_on(monkeypatch, bad_calls) -> list[int]:
    """Make pretrain.train.next_token_loss return NaN on the training calls (0-based) in ``bad_calls``."""
    original = train_module.next_token_loss
    calls = [0]

    def next_token_loss(logits, targets):
        loss = original(logits, targets)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        index = calls[0]
        calls[0] += 1
        return loss * float("nan") if bad_calls(index) else loss

    monkeypatch.setattr(train_module, "next_token_loss", next_token_loss)
    return calls


def _watch_steps(monkeypatch) -> list[tuple[int, dict, dict, int]]:
    """Record (step, weights before, weights after, Adam steps taken) around every Trainer.train_step."""
    seen = []
    original = Trainer.train_step

    def train_step(self, batches):
        before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        record = original(self, batches)
        after = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        adam = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        seen.append((self.counters.step, before, after, max(adam, default=0)))
        return record

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return seen


def test_a_nan_loss_skips_the_step_counts_it_and_the_run_goes_on(token_dataset, tmp_path, monkeypatch):
    calls = _nan_on(monkeypatch, lambda i: i == 5)  # micro-step 5: the second micro-step of step 3
    seen = _watch_steps(monkeypatch)
    trainer = _trainer(tmp_path, token_dataset, "run", train={"steps": 6, "grad_accum": 2},
                       checkpoint={"every": 0}, logging=QUIET)
    assert trainer.fit() == 0
    assert calls[0] == 12
    steps, evals = _records(trainer)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 1, 1, 1]
    assert steps[2]["loss"] is None and all(math.isfinite(r["loss"]) for i, r in enumerate(steps) if i != 2)
    assert evals and math.isfinite(evals[-1]["val_loss"])
    for step, before, after, adam_steps in seen:
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (step == 3), step  # the NaN step leaves every weight as it was, the others move them
    assert [a for *_, a in seen] == [1, 2, 2, 3, 4, 5]  # and the optimizer took no step
    saved = json.loads((trainer.run_dir / "checkpoints/step-00000006/trainer.json").read_text())
    assert saved["skipped_steps"] == 1 and saved["bad_in_row"] == 0 and saved["step"] == 6


def test_non_consecutive_nans_do_not_stop_the_run(token_dataset, tmp_path, monkeypatch):
    _nan_on(monkeypatch, lambda i: i // 2 in (1, 3, 4))  # steps 2, 4 and 5 (grad_accum 2)
    trainer = _trainer(tmp_path, token_dataset, "run", train={"steps": 7, "grad_accum": 2, "max_bad_steps": 3},
                       checkpoint={"every": 0}, eval={"every": 0, "rows": 2, "steps": 1}, logging=QUIET)
    assert trainer.fit() == 0
    steps, _ = _records(trainer)
    assert [r["skipped_steps"] for r in steps] == [0, 1, 1, 2, 3, 3, 3]


def test_max_bad_steps_nans_in_a_row_stop_the_run_with_a_message(token_dataset, tmp_path, monkeypatch):
    _nan_on(monkeypatch, lambda i: i >= 4)  # every step from step 3 on
    trainer = _trainer(tmp_path, token_dataset, "run", train={"steps": 12, "grad_accum": 2, "max_bad_steps": 4},
                       checkpoint={"every": 2}, logging=QUIET)
    with pytest.raises(TrainingError, match=r"4 steps in a row had a non-finite loss") as err:
        trainer.fit()
    assert "step 6" in str(err.value) and str(trainer.checkpoints.root) in str(err.value)
    steps, _ = _records(trainer)
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 2, 3, 4]  # the fatal step is logged too
    # the checkpoints hold the last good weights (a skipped step changes none) to resume from
    assert sorted(p.name for p in trainer.checkpoints.checkpoints.checkpoints()) == ["step-00000002", "step-00000004"]


def test_the_cli_exits_1_with_error_on_stderr_after_max_bad_steps(token_dataset, tmp_path, monkeypatch, capsys):
    _nan_on(monkeypatch, lambda i: True)
    config = run_config(tmp_path, token_dataset, logging=QUIET)
    assert main(["--config", str(config), "--set", "train.max_bad_steps=2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 2 steps in a row had a non-finite loss or gradient norm"), err


def test_a_real_divergence_stops_the_cli_subprocess_with_status_1(token_dataset, tmp_path):
    # lr 1e30: Adam moves every weight by ~1e29 at step 1, after which every loss is NaN
    config = run_config(tmp_path, token_dataset, logging={"every": 1, "tensorboard": False, "progress": True})
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", str(config), "--set", "optim.lr=1e30",
         "--set", "optim.min_lr=0", "--set", "train.max_bad_steps=3"],
        cwd=ROOT, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "error: 3 steps in a row had a non-finite loss or gradient norm" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped 2" in proc.stdout  # the console line counts the skipped steps


def _losses(trainer: Trainer) -> list[float]:
    assert trainer.fit() == 0
    steps, evals = _records(trainer)
    return [r["loss"] for r in steps] + [r["grad_norm"] for r in steps] + [r["val_loss"] for r in evals]


def test_activation_checkpointing_gives_the_same_losses(token_dataset, tmp_path):
    sections = dict(model={"dropout": 0.1}, train={"steps": 5, "grad_accum": 2}, checkpoint={"every": 0},
                    eval={"every": 0, "rows": 2, "steps": 2}, logging=QUIET)
    # each trainer is built right before it trains: building one reseeds the global RNG that dropout draws from
    plain = _trainer(tmp_path, token_dataset, "plain", **sections)
    a = _losses(plain)
    sections["train"] = {**sections["train"], "activation_checkpointing": True}
    recomputed = _trainer(tmp_path, token_dataset, "recomputed", **sections)
    b = _losses(recomputed)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    for (name, p), q in zip(plain.model.named_parameters(), recomputed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_carry_state_false_resets_the_state_every_window(token_dataset, tmp_path):
    sections = dict(train={"steps": 4, "grad_accum": 2}, checkpoint={"every": 0},
                    eval={"every": 0, "rows": 2, "steps": 3}, logging=QUIET)
    carried = _trainer(tmp_path, token_dataset, "carried", **sections)
    sections["train"] = {**sections["train"], "carry_state": False}
    reset = _trainer(tmp_path, token_dataset, "reset", **sections)

    # forward_window ignores whatever state it is given: a carried one or garbage equals a fresh one
    batches = reset.train_batches()
    try:
        first, second = next(batches), next(batches)
    finally:
        batches.close()
    assert not second.reset.any()  # micro-step 1: no lane starts here
    rows = first.tokens.shape[0]
    with torch.no_grad():
        _, state, _ = reset.forward_window(first, reset.model.init_state(rows))
        fresh_loss, fresh_state, _ = reset.forward_window(second, reset.model.init_state(rows))
        for given in (state, _garbage(state)):
            loss, out, _ = reset.forward_window(second, given)
            assert torch.equal(loss, fresh_loss)
            assert all(torch.equal(out[k], fresh_state[k]) for k in out.keys())
        # with carry_state true the same state changes the result (the model does read it)
        carried.model.load_state_dict(reset.model.state_dict())
        with_state, _, _ = carried.forward_window(second, state)
        without, _, _ = carried.forward_window(second, carried.model.init_state(rows))
        assert torch.equal(without, fresh_loss) and not torch.allclose(with_state, without)

    # and over a run: micro-step 1 already reads a carried state, so every step's loss differs
    a, b = _losses(carried), _losses(reset)
    assert a[0] != b[0] and all(x != y for x, y in zip(a, b))


def _garbage(state):
    return type(state)({k: (torch.randn_like(v.float()).to(v.dtype) * 3 if v.is_floating_point() else v + 7)
                        for k, v in state.items()})


def test_grad_accum_consumes_consecutive_windows_of_the_same_lanes(token_dataset, tmp_path, monkeypatch):
    seen = []
    original = Trainer.forward_window

    def forward_window(self, batch, state):
        loss, out, per_row = original(self, batch, state)
        if self.model.training:
            seen.append((self.counters.step, batch, state, out))
        return loss, out, per_row

    monkeypatch.setattr(Trainer, "forward_window", forward_window)
    rows, accum, steps = 4, 2, 5
    trainer = _trainer(tmp_path, token_dataset, "run", data={"rows": rows, "workers": 0},
                       train={"steps": steps, "grad_accum": accum}, checkpoint={"every": 0}, logging=QUIET)
    trainer.fit()
    layout = LaneLayout(trainer.manifest.split("train").windows, rows, trainer.cfg.data.rotation_seed)
    assert [(opt, batch.step) for opt, batch, _, _ in seen] == [(s // accum, s) for s in range(steps * accum)]
    for (opt, a, _, out_a), (opt_b, b, in_b, _) in zip(seen, seen[1:]):
        assert a.rows.tolist() == b.rows.tolist() == list(range(rows))
        assert in_b is out_a  # the state goes from each micro-step to the next, within and across steps
        assert torch.equal(b.windows, a.windows + 1)  # the next window of the same lane
        assert torch.equal(b.tokens[:, 0], a.tokens[:, -1])
        assert torch.equal(b.windows, torch.from_numpy(layout.windows(b.step)[0]))
    records, _ = _records(trainer)
    assert [r["tokens"] for r in records] == [(i + 1) * rows * SEQ_LEN * accum for i in range(steps)]


def test_bfloat16_autocast_on_cpu_trains_with_finite_losses(token_dataset, tmp_path):
    sections = dict(train={"steps": 3, "grad_accum": 2, "dtype": "bfloat16", "device": "cpu"},
                    checkpoint={"every": 0}, eval={"every": 0, "rows": 2, "steps": 2}, logging=QUIET)
    trainer = _trainer(tmp_path, token_dataset, "bf16", **sections)
    assert trainer.dtype == torch.bfloat16
    dtypes = []
    trainer.model.head.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    bf16 = _losses(trainer)
    assert set(dtypes) == {torch.bfloat16}  # the matmuls ran under autocast
    assert all(math.isfinite(x) for x in bf16)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay float32
    sections["train"] = {**sections["train"], "dtype": "float32"}
    fp32 = _losses(_trainer(tmp_path, token_dataset, "fp32", **sections))
    assert bf16[0] == pytest.approx(fp32[0], abs=0.05)  # the same model, in lower precision
    assert math.log(VOCAB) - 0.5 < bf16[0] < math.log(VOCAB) + 0.5


def test_torch_compile_trains_the_same_model(token_dataset, tmp_path):
    torch._dynamo.reset()  # no compiled code of another test counts against the recompile limit
    # One layer, grad_accum 1, no evaluation: the fewest graphs to compile. A cold inductor cache
    # costs about a minute and a half on one CPU thread; a warm one (a second run) a few seconds.
    sections = dict(model={"arch": "zarvan", "vocab_size": VOCAB, "d_model": 32, "n_layers": 1, "n_heads": 2,
                           "chunk_size": 8},
                    train={"steps": 3, "grad_accum": 1, "device": "cpu"}, checkpoint={"every": 0},
                    eval={"rows": 1000}, logging=QUIET)  # more eval rows than val windows: no evaluation
    eager = _losses(_trainer(tmp_path, token_dataset, "eager", **sections))
    sections["train"] = {**sections["train"], "compile": True}
    try:
        compiled_trainer = _trainer(tmp_path, token_dataset, "compiled", **sections)
        compiled = _losses(compiled_trainer)
    except Exception as exc:  # only a machine whose inductor cannot build kernels (no C++ compiler)
        if "InductorError" in type(exc).__name__ or "CppCompileError" in repr(exc):
            pytest.skip(f"torch.compile's inductor backend cannot compile on this machine: {exc!r:.300}")
        raise
    assert len(compiled) == len(eager) == 2 * 3
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_compiled_blocks_compile_once_not_once_per_layer(token_dataset, tmp_path, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    compile_module = torch.nn.Module.compile
    # the guards are dynamo's, whatever the backend: "eager" keeps this fast
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager", **kw))
    sections = dict(model={"arch": "zarvan", "vocab_size": VOCAB, "d_model": 16, "n_layers": 10, "n_heads": 2,
                           "chunk_size": 8},
                    train={"steps": 2, "grad_accum": 2, "compile": True, "device": "cpu"},
                    checkpoint={"every": 0}, eval={"rows": 1000}, logging=QUIET)
    try:
        assert _trainer(tmp_path, token_dataset, "deep", **sections).fit() == 0
    finally:
        torch._dynamo.reset()
