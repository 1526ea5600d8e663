"""Train a causal LM on token shards: ``python -m pretrain --config RUN.yaml [--set key=value ...]``.

Each row of the global batch streams its lane of the train split (``zarvan_dist.data.lanes``) and
carries its recurrent state from one window to the next; with ``data.sources`` the rows are dealt to
several datasets by weight, each row a lane of one source (``zarvan_dist.data.mixture``). The
micro-step is the data cursor, so a checkpoint plus the lane states is everything a resumed run
needs to continue exactly.

One process, or many under torchrun / the deepspeed launcher (``engine: ddp | fsdp | deepspeed``):
rank r of R streams rows [r*G/R, (r+1)*G/R) of the G-row global batch; loss, tokens and metrics are
reduced over the ranks and only rank 0 writes metrics and TensorBoard.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import sys
import time
import traceback
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from zarvan_dist.config import ConfigError, to_dict
from zarvan_dist.data import DatasetError, LaneLayout, Manifest
from zarvan_dist.data.loader import LaneBatch, MixtureLoader
from zarvan_dist.data.mixture import MixtureLayout, deal_rows
from zarvan_dist.models import ModelConfig, RecurrentState, build_model
from zarvan_dist.training.checkpoint import (
    CheckpointError,
    Counters,
    RunCheckpointer,
    checkpoint_name,
    load_weights,
    open_checkpoint,
    save_config,
)
from zarvan_dist.training.config import RunConfig, check_neighbours, load_run_config
from zarvan_dist.training.engines import (
    Collective,
    autocast,
    build_engine,
    init_distributed,
    resolve_device,
    resolve_dtype,
    shutdown_distributed,
)
from zarvan_dist.training.evaluate import (
    Evaluator,
    forward_window,
    mixture_loss,
    next_token_loss,
    reset_rows,
    row_losses,
)
from zarvan_dist.training.lock import RunLock, RunLockedError
from zarvan_dist.training.metrics import ExpertProbe, MetricsLogger, Progress, memory_gib, peak_tflops, state_norms
from zarvan_dist.training.schedule import learning_rate

REQUEUE_EXIT_CODE = 75
"""Exit status after a SIGTERM / SIGUSR1 checkpoint (EX_TEMPFAIL): the scheduler should requeue the job."""
TRACEBACK_ENV = "ZARVAN_TRACEBACK"
"""Set to print the traceback of an unexpected error after its one-line message."""
INTERRUPT_EXIT_CODE = 130
"""Exit status after a Ctrl-C (SIGINT) checkpoint, as a shell reports an interrupted command (128 + 2)."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


def resolve_model_config(cfg: RunConfig, manifest: Manifest) -> ModelConfig:
    """The run's model config with the dataset's vocabulary size (validated again)."""
    if not cfg.model.causal:
        raise ConfigError("model.causal: pretraining needs a causal model (causal: true)")
    data = to_dict(cfg.model)
    data["vocab_size"] = manifest.vocab_size
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"model (with the dataset's vocab_size {manifest.vocab_size}): {exc}") from None


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases, norms and embedding tables do not."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in no_decay else rest).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def check_sources(cfg: RunConfig, manifests: list[Manifest]) -> None:
    """Every source of a mixture must share the first one's tokenizer (sha256) and seq_len."""
    sources = cfg.data.mixture
    first = manifests[0]
    for i, (source, manifest) in enumerate(zip(sources[1:], manifests[1:]), 1):
        for key, was, now in (("tokenizer sha256", first.tokenizer.sha256, manifest.tokenizer.sha256),
                              ("seq_len", first.seq_len, manifest.seq_len)):
            if was != now:
                raise ConfigError(f"data.sources[{i}] ({source.name}, {source.dir}): {key} is {now}, source "
                                  f"{sources[0].name} has {was}; every source of a mixture must be written with one "
                                  f"tokenizer and seq_len")


def mixture_layout(cfg: RunConfig, manifests: list[Manifest]) -> MixtureLayout:
    """The train lanes of every source: ``data.rows`` dealt by weight (``zarvan_dist.data.mixture``)."""
    sources = cfg.data.mixture
    try:
        rows = deal_rows([s.weight for s in sources], cfg.data.rows, [s.name for s in sources])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    layouts = []
    for source, manifest, n in zip(sources, manifests, rows):
        try:
            layouts.append(LaneLayout(manifest.split("train").windows, n, cfg.data.rotation_seed))
        except ValueError as exc:
            where = f"source {source.name}, {n} of its rows" if cfg.data.sources else "data.rows"
            raise ConfigError(f"{where}: {exc} (train split of {source.dir})") from None
    return MixtureLayout(tuple(layouts))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward pass (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place with torch.compile (parameter names unchanged)."""
    for block in model.blocks:
        block.compile()


def nonfinite_rows(state: RecurrentState) -> torch.Tensor:
    """[B] bool: rows holding a NaN or an infinity in any floating state tensor."""
    bad = None
    for value in state.to_dict().values():
        if value.is_floating_point():
            row_bad = ~torch.isfinite(value).flatten(1).all(1)
            bad = row_bad if bad is None else bad | row_bad
    return bad if bad is not None else torch.zeros(state.batch_size or 0, dtype=torch.bool)


class Trainer:
    """One process (CPU or one GPU): model, optimizer, lanes, checkpoints and metrics of a run.

    The job's rank 0 holds the run directory's lock (``zarvan_dist.training.lock``) from here until
    ``fit`` ends; ``break_lock`` takes over a lock another host left behind.
    """

    def __init__(self, cfg: RunConfig, break_lock: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.sources = cfg.data.mixture
        self.mixture = bool(cfg.data.sources)  # per-source figures; data.dir alone is the one-dataset run
        self.manifests = [Manifest.load(source.dir) for source in self.sources]
        self.manifest = self.manifests[0]
        check_sources(cfg, self.manifests)
        hashes = [hashlib.sha256(m.to_json().encode()).hexdigest() for m in self.manifests]
        self.dataset_sha256 = hashes if self.mixture else hashes[0]
        self.env, self.device = init_distributed(cfg.engine, resolve_device(cfg.train.device),
                                                 cfg.train.collective_timeout_min,
                                                 cpu_collectives=cfg.engine == "fsdp" and cfg.fsdp.cpu_offload)
        self.comm = Collective(self.env, self.device)
        self.lock = RunLock(self.run_dir)
        refused = None
        if self.env.main:
            try:
                self.lock.acquire(break_lock)
            except RunLockedError as exc:
                refused = str(exc)
        refused = self.comm.broadcast(refused)  # every rank stops, none waits in a collective
        if refused is not None:
            raise RunLockedError(refused)
        self.dtype = resolve_dtype(cfg.train.dtype, self.device)
        self.model_cfg = resolve_model_config(cfg, self.manifest)
        check_neighbours(cfg, self.model_cfg, self.manifest)
        if self.model_cfg.arch == "nonattn" and self.model_cfg.retrieval and cfg.data.neighbours is None \
                and self.env.main:
            print("note: model.retrieval is true but data.neighbours is unset: the model trains without "
                  "retrieved text (it fuses nothing)", file=sys.stderr)
        self.seq_len = self.manifest.seq_len
        self.layout = mixture_layout(cfg, self.manifests)
        try:
            self.rows = self.layout.rank_rows(self.env.rank, self.env.world)
        except ValueError as exc:
            raise ConfigError(f"data.rows: {exc}") from None
        self.row_source = torch.from_numpy(self.layout.source_of(self.rows)).to(self.device)
        self.val_layouts = [self._val_layout(m, s.dir) for m, s in zip(self.manifests, self.sources)]
        self.checkpoints = RunCheckpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.env, self.comm,
                                           self.device)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = build_model(self.model_cfg).to(self.device)
        if cfg.checkpoint.init_from:
            load_weights(model, open_checkpoint(cfg.checkpoint.init_from).path, self.device)  # before any wrapping
        self.flops_per_token = model.flops_per_token(self.seq_len)  # before ZeRO-3 partitions the parameters
        self.probe = ExpertProbe(model)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.train.compile:
            apply_compile(model)
        if self.env.rank:
            torch.manual_seed(cfg.seed + self.env.rank)  # each rank its own dropout stream
        # DeepSpeed resuming on another world size loads a universal conversion of its checkpoint
        self.universal = self.checkpoints.prepare_universal(
            self.checkpoints.resume_path(cfg.checkpoint.resume) if cfg.engine == "deepspeed" else None,
            cfg.engine, cfg.deepspeed.zero_stage)
        self.engine = build_engine(model, lambda m: build_optimizer(m, cfg), cfg, self.env, self.device,
                                   load_universal=self.universal is not None)
        self.model = self.engine.module
        self.optimizer = self.engine.optimizer
        self.evaluator = Evaluator(self.model, self.device, self.manifest.bos_id, self.engine.forward, self.autocast,
                                   self.comm.sum)
        self.counters = Counters()
        self.lane_state = self.model.init_state(len(self.rows), self.device)
        self.stop_signal: int | None = None
        self.stop_agreed = False

    # ---- wiring
    def _val_layout(self, manifest: Manifest, url: str) -> LaneLayout | None:
        windows = manifest.split("val").windows
        if windows < self.cfg.eval.rows:
            print(f"note: the val split of {url} has {windows} windows, fewer than eval.rows={self.cfg.eval.rows}: "
                  f"no validation of it", file=sys.stderr)
            return None
        if self.cfg.eval.rows % self.env.world:
            raise ConfigError(f"eval.rows: the {self.cfg.eval.rows} validation rows do not divide among "
                              f"{self.env.world} ranks")
        return LaneLayout(windows, self.cfg.eval.rows)

    def autocast(self):
        return autocast(self.device, self.dtype, cache=self.cfg.engine not in ("fsdp", "deepspeed"))

    def train_batches(self) -> Iterator[LaneBatch]:
        """The train lanes from the current micro-step on."""
        d = self.cfg.data
        return iter(MixtureLoader([s.dir for s in self.sources], "train", self.layout, rows=self.rows,
                                  start=self.counters.lane_step, workers=d.workers,
                                  prefetch=d.prefetch, neighbours=d.neighbours))

    def lanes_info(self) -> dict:
        """The lanes' shape a checkpoint records: the train windows of one dataset, or each source's."""
        if not self.mixture:
            return {"train_windows": self.layout.layouts[0].num_windows}
        return {"sources": [{"name": s.name, "rows": lay.rows, "train_windows": lay.num_windows}
                            for s, lay in zip(self.sources, self.layout.layouts)]}

    # ---- one step
    def forward_window(self, batch: LaneBatch, state: RecurrentState
                       ) -> tuple[torch.Tensor, RecurrentState, torch.Tensor | None]:
        """Loss of one micro-step, the rows' state after it (state reset where the lane restarts) and, in a
        mixture, each row's mean loss [R] (detached; the loss is then their mean)."""
        inputs = batch.inputs.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        neighbours = None if batch.neighbours is None else batch.neighbours.to(self.device, non_blocking=True)
        logits, state = forward_window(self.engine.forward, self.model, inputs, state, batch.reset,
                                       self.manifest.bos_id, neighbours, self.cfg.train.carry_state, self.autocast)
        if not self.mixture:
            return next_token_loss(logits, targets), state, None
        per_row = row_losses(logits, targets)
        return per_row.mean(), state, per_row.detach()

    def train_step(self, batches: Iterable[LaneBatch]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` consecutive micro-steps; skipped if not finite.

        In a job the loss is the mean over every rank's rows, and every rank learns whether any
        rank was asked to stop (``stop_agreed``), so all of them stop after the same step.
        """
        cfg = self.cfg
        ga = cfg.train.grad_accum
        self.engine.train(True)
        self.engine.zero_grad()
        total = torch.zeros((), device=self.device)
        by_source = torch.zeros(len(self.sources), device=self.device)  # a mixture: sums of its rows' mean losses
        for i, batch in enumerate(islice(batches, ga)):
            loss, self.lane_state, per_row = self.forward_window(batch, self.lane_state)
            self.engine.backward(loss, last=i == ga - 1)
            total += loss.detach()
            if per_row is not None:
                by_source.index_add_(0, self.row_source, per_row)
            self.counters.micro_step += 1
            self.counters.tokens += batch.targets.numel() * self.env.world
        loss_sum, stops, *source_sums = self.comm.sum([float(total), float(self.stop_signal is not None),
                                                       *by_source.tolist()])
        self.stop_agreed = stops > 0
        loss = loss_sum / (ga * self.env.world)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        lr = learning_rate(self.counters.step, cfg.train.steps, cfg.optim)
        grad_norm, applied = self.engine.step(lr, clip, math.isfinite(loss))
        if applied:
            self.counters.bad_in_row = 0
        else:
            self.counters.skipped_steps += 1
            self.counters.bad_in_row += 1
            bad = nonfinite_rows(self.lane_state)
            self.lane_state = reset_rows(self.lane_state, bad, self.model.init_state(len(bad), self.device))
        self.counters.step += 1
        record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.counters.tokens,
                  "skipped_steps": self.counters.skipped_steps}
        for source, layout, loss_sum in zip(self.sources if self.mixture else (), self.layout.layouts, source_sums):
            record[f"loss/{source.name}"] = loss_sum / (ga * layout.rows)
        return record

    def source_figures(self) -> dict[str, float]:
        """Each source's tokens since its lanes began, share of the tokens against its weight, epoch."""
        if not self.mixture:
            return {}
        step = self.counters.lane_step
        total_weight = sum(s.weight for s in self.sources)
        out = {}
        for source, layout, epoch in zip(self.sources, self.layout.layouts, self.layout.epochs(step)):
            out[f"tokens/{source.name}"] = step * layout.rows * self.seq_len
            out[f"fraction/{source.name}"] = layout.rows / self.layout.rows
            out[f"weight/{source.name}"] = source.weight / total_weight
            out[f"epoch/{source.name}"] = epoch
        return out

    def evaluate(self) -> dict[str, dict]:
        """The validation of ``eval.steps`` micro-steps (0: all) of the ``eval.rows`` val lanes from their start,
        state carried as in training (``Evaluator.lanes``; the job's figures on every rank), per source with a
        val split of at least ``eval.rows`` windows."""
        cfg = self.cfg
        was_training = self.engine.training
        self.engine.train(False)
        try:
            return {source.name: self.evaluator.lanes(source.dir, "val", layout,
                                                      layout.rank_rows(self.env.rank, self.env.world),
                                                      cfg.eval.steps, cfg.train.carry_state,
                                                      neighbours=cfg.data.neighbours)
                    for source, layout in zip(self.sources, self.val_layouts) if layout is not None}
        finally:
            self.engine.train(was_training)

    # ---- checkpoints
    def save(self) -> Path:
        """Write checkpoint ``step-N`` (collective: every rank calls it; rank 0 seals it)."""
        step = self.counters.step
        lr = learning_rate(max(step - 1, 0), self.cfg.train.steps, self.cfg.optim)
        return self.checkpoints.save(step, self.engine, self.counters, self.lane_state, lr, self.lanes_info(),
                                     self.seq_len, self.resolved_config(), self.dataset_sha256)

    def resolved_config(self) -> dict:
        data = self.cfg.to_dict()
        data["model"] = to_dict(self.model_cfg)
        return data

    # ---- the loop
    def fit(self) -> int:
        """Train to ``train.steps``; returns the exit status (0, or REQUEUE_EXIT_CODE / INTERRUPT_EXIT_CODE
        after a signal). The run directory's lock is released at the end, however it ends."""
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> int:
        cfg = self.cfg
        self.install_signal_handlers()
        resumed = self.resume()
        if self.env.main:
            save_config(_mkdir(self.run_dir) / "config.yaml", self.resolved_config())
            self.metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard, resumed)
        else:
            self.metrics = _NoMetrics()
        self.meter = Meter(self)
        saved = resumed
        if self.counters.pending_eval:  # the evaluation a stop skipped before the checkpoint
            self.validate(self.counters.pending_eval)
        batches = None
        try:
            batches = self.train_batches()
            while self.counters.step < cfg.train.steps and not self.stopping():
                step = self.counters.step + 1
                log_now = step % cfg.logging.every == 0 or step == cfg.train.steps
                self.probe.active = log_now
                record = self.train_step(batches)
                self.probe.active = False
                self.metrics.log(step, self.meter.extend(record) if log_now else record)
                self.check_bad_steps(record)
                started = time.perf_counter()
                if any(self.val_layouts) and _due(step, cfg.eval.every, cfg.train.steps):
                    if self.stopping():  # checkpoint within the launcher's grace period; evaluate after the resume
                        self.counters.pending_eval = step
                    else:
                        self.validate(step)
                if _due(step, cfg.checkpoint.every, cfg.train.steps):
                    self.save()
                    saved = step
                self.meter.last_time += time.perf_counter() - started  # tokens/s counts training time only
            if self.stopping() and self.counters.step < cfg.train.steps:
                path = self.save() if saved != self.counters.step else self.checkpoints.root / checkpoint_name(saved)
                why = f"signal {signal.Signals(self.stop_signal).name}" if self.stop_signal else "stop asked by a rank"
                if self.stop_signal == signal.SIGINT:
                    print(f"{why}: checkpoint {path} written; rank {self.env.rank} exiting with "
                          f"{INTERRUPT_EXIT_CODE} (run the same command to resume)", flush=True)
                    return INTERRUPT_EXIT_CODE
                print(f"{why}: checkpoint {path} written; rank {self.env.rank} "
                      f"exiting with {REQUEUE_EXIT_CODE} so the job is requeued", flush=True)
                return REQUEUE_EXIT_CODE
        finally:
            if batches is not None:
                batches.close()
            self.metrics.close()
        return 0

    def stopping(self) -> bool:
        """A stop was asked: by a signal to this process, or (in a job) to any rank as of the last step."""
        return self.stop_agreed if self.comm.active else self.stop_signal is not None

    def check_bad_steps(self, record: dict[str, float]) -> None:
        """Stop the run after ``train.max_bad_steps`` non-finite steps in a row."""
        if self.counters.bad_in_row >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{self.counters.bad_in_row} steps in a row had a non-finite loss or gradient norm "
                f"(step {self.counters.step}: loss {record['loss']}, grad norm {record['grad_norm']}); stopping. "
                f"Lower optim.lr, check the data, or resume from the last checkpoint in {self.checkpoints.root}")

    def resume(self) -> int | None:
        """Load the checkpoint ``checkpoint.resume`` names; returns its step, or None when starting afresh.

        With ``auto``, a checkpoint whose files verify but cannot be read is passed over for the newest
        older one; when checkpoints exist and none can be resumed the run stops (nothing is pruned)."""
        mode = self.cfg.checkpoint.resume
        path = self.checkpoints.resume_path(mode)
        if path is None:
            return None
        model = to_dict(self.model_cfg)
        while True:
            new_lanes = self.checkpoints.check_resumable(path, self.cfg, model, self.lanes_info(), self.seq_len,
                                                         self.engine, self.dataset_sha256)
            try:
                lane_state, self.counters = self.checkpoints.load(path, self.engine, range(0) if new_lanes else
                                                                  self.rows, self.cfg.seed, self.universal)
                break
            except CheckpointError as exc:
                if mode != "auto":
                    raise CheckpointError(f"{path}: {exc}") from None
                path = self.checkpoints.older_than(path, str(exc))
                self.universal = None
        self.universal = None
        if new_lanes:  # checkpoint.resume_reweight: the new lanes start here, from fresh states
            self.counters.lanes_from = self.counters.micro_step
        else:
            self.lane_state = lane_state
        if self.env.main:
            print(f"resumed from {path}: step {self.counters.step}, micro-step {self.counters.micro_step}, "
                  f"{self.counters.tokens:,} tokens, {self.env.world} rank(s)"
                  + (": data.sources changed, new lanes from their start with fresh states" if new_lanes else ""),
                  flush=True)
        return self.counters.step

    def validate(self, step: int) -> None:
        """Evaluate (``evaluate``) and log the figures at ``step``: in a mixture ``val_loss/<name>`` per source
        and ``val_loss``, their mean weighted by the sources' weights."""
        results = self.evaluate()
        loss = mixture_loss({n: r["loss"] for n, r in results.items()}, {s.name: s.weight for s in self.sources})
        if self.mixture:
            record = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
                      **{f"val_loss/{n}": r["loss"] for n, r in results.items()}}
        else:
            (result,) = results.values()
            record = {"val_loss": result["loss"], "val_perplexity": result["perplexity"]}
        self.metrics.log(step, record)
        self.counters.pending_eval = 0
        if self.env.main:
            each = "".join(f", {n} {r['loss']:.4f}" for n, r in results.items()) if self.mixture else ""
            print(f"step {step}: val loss {loss:.4f}, perplexity {record['val_perplexity']:.2f}{each}", flush=True)

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1: finish the current step, checkpoint, exit with ``REQUEUE_EXIT_CODE``. SIGINT
        (Ctrl-C): the same, exiting with ``INTERRUPT_EXIT_CODE``; a second SIGINT stops at once."""
        def handler(signum: int, frame: object) -> None:
            if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                raise KeyboardInterrupt
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, handler)


class Meter:
    """The figures of a log step: throughput since the last one, MFU, memory, probes; prints the progress line."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        cfg = trainer.cfg
        self.peak = peak_tflops(cfg.logging.peak_tflops, trainer.device)
        self.flops_per_token = trainer.flops_per_token
        self.progress = Progress(cfg.train.steps, trainer.counters.step)
        self.last_time, self.last_tokens = time.perf_counter(), trainer.counters.tokens

    def extend(self, record: dict[str, float]) -> dict[str, float]:
        t = self.trainer
        now = time.perf_counter()
        tps = (t.counters.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, t.counters.tokens
        # every rank has the same keys: expert shares and squared state norms are means over equal row counts
        squares = {k: v * v for k, v in state_norms(t.lane_state).items()}
        shared = t.comm.mean_dict({**t.probe.pop(), **squares})
        shared.update({k: math.sqrt(shared[k]) for k in squares})
        record.update(perplexity=math.exp(min(record["loss"], 50.0)), tokens_per_s=tps,
                      memory_gib=t.comm.max(memory_gib(t.device)), **shared, **t.source_figures())
        if self.peak is not None:  # MFU of the job: its tokens/s over the peak of all its devices
            record["mfu"] = tps * self.flops_per_token / (self.peak * 1e12 * t.env.world)
        if t.cfg.logging.progress and t.env.main:
            print(self.progress.line(t.counters.step, record), flush=True)
        return record


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, record: dict[str, float], tensorboard: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _due(step: int, every: int, last: int) -> bool:
    """An interval event (evaluation, checkpoint) is due after ``step``: every ``every`` steps and at the end."""
    return step == last or (every > 0 and step % every == 0)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Exit status: 0 done, 1 error, {REQUEUE_EXIT_CODE} checkpointed after SIGTERM/SIGUSR1 (requeue), "
               f"{INTERRUPT_EXIT_CODE} checkpointed after Ctrl-C (a second Ctrl-C stops without one).")
    parser.add_argument("--config", required=True, metavar="FILE", help="run config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="auto|none|PATH",
                        help="shorthand for --set checkpoint.resume=...: auto (default) continues from "
                             "RUN/checkpoints/latest, none starts afresh, or a checkpoint directory")
    parser.add_argument("--break-lock", action="store_true",
                        help="take over the run directory's lock (RUN/trainer.lock) that a trainer on another host "
                             "left behind; only when no trainer runs there any more")
    parser.add_argument("--resume-reweight", action="store_true",
                        help="shorthand for --set checkpoint.resume_reweight=true: resume although data.sources "
                             "(names, dirs, weights) changed, with the new lanes from their start and fresh states")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    overrides += ["checkpoint.resume_reweight=true"] if args.resume_reweight else []
    status = None
    try:
        cfg = load_run_config(args.config, overrides)
        status = Trainer(cfg, args.break_lock).fit()
        return status
    except (ConfigError, DatasetError, CheckpointError, TrainingError, RunLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted twice: stopped without a checkpoint (the last one written stays latest)",
              file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    except Exception as exc:  # an engine's or a collective's failure (a peer gone, out of memory): one line too
        print(f"error: rank {os.environ.get('RANK', '0')}: {type(exc).__name__}: {' '.join(str(exc).split())[:1000]}"
              + ("" if os.environ.get(TRACEBACK_ENV) else f" (set {TRACEBACK_ENV}=1 for the traceback)"),
              file=sys.stderr)
        if os.environ.get(TRACEBACK_ENV):
            traceback.print_exc()
        return 1
    finally:
        shutdown_distributed(finished=status is not None)
