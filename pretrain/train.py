"""Train a causal LM on token shards: ``python -m pretrain --config RUN.yaml [--set key=value ...]``.

Each row of the global batch streams its lane of the train split (``zarvan_dist.data.lanes``) and
carries its recurrent state from one window to the next. The micro-step is the data cursor, so a
checkpoint plus the lane states is everything a resumed run needs to continue exactly.

One process, or many under torchrun / the deepspeed launcher (``engine: ddp | fsdp | deepspeed``):
rank r of R streams rows [r*G/R, (r+1)*G/R) of the G-row global batch; loss, tokens and metrics are
reduced over the ranks and only rank 0 writes metrics and TensorBoard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pickle
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from zarvan_dist.config import ConfigError, load_yaml, to_dict
from zarvan_dist.data import DatasetError, LaneLayout, Manifest, NeighbourManifest, NeighbourReader
from zarvan_dist.data.loader import LaneBatch, LaneLoader
from zarvan_dist.models import ModelConfig, RecurrentState, build_model
from zarvan_dist.training.checkpoint import (
    CheckpointError,
    Checkpointer,
    checkpoint_name,
    load_tensors,
    load_weights,
    resolve_checkpoint,
    save_config,
    save_tensors,
    weights_source,
    write_json,
)
from zarvan_dist.training.config import RunConfig, load_run_config
from zarvan_dist.training.engines import (
    FORMATS,
    Collective,
    build_engine,
    convert_to_universal,
    init_distributed,
    resolve_device,
    resolve_dtype,
    shutdown_distributed,
)
from zarvan_dist.training.metrics import ExpertProbe, MetricsLogger, Progress, memory_gib, peak_tflops, state_norms
from zarvan_dist.training.schedule import learning_rate

REQUEUE_EXIT_CODE = 75
"""Exit status after a SIGTERM / SIGUSR1 checkpoint (EX_TEMPFAIL): the scheduler should requeue the job."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class Counters:
    """The trainer's progress; saved in every checkpoint as ``trainer.json``."""

    step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-steps done: the lanes' cursor."""
    tokens: int = 0
    """Target tokens trained on (all rows)."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient norm."""
    bad_in_row: int = 0
    """Non-finite steps since the last good one."""

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, data: dict[str, int]) -> None:
        for key, value in data.items():
            if hasattr(self, key):
                setattr(self, key, int(value))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float32: logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


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


def check_neighbours(cfg: RunConfig, model_cfg: ModelConfig, manifest: Manifest) -> None:
    """Refuse a neighbour sidecar (``data.neighbours``) that the model or the dataset cannot use."""
    url = cfg.data.neighbours
    if url is None:
        return
    if model_cfg.arch != "nonattn" or not model_cfg.retrieval:
        what = f"arch {model_cfg.arch}" if model_cfg.arch != "nonattn" else "retrieval: false"
        raise ConfigError(f"data.neighbours: {url} is set, but the model ({what}) reads no neighbours; "
                          f"retrieval needs model.arch: nonattn with model.retrieval: true (or unset data.neighbours)")
    try:
        sidecar = NeighbourManifest.load(url)
    except ConfigError as exc:
        raise ConfigError(f"data.neighbours: {exc}") from None
    if sidecar.seq_len != manifest.seq_len:
        raise ConfigError(f"data.neighbours: the sidecar {url} has seq_len {sidecar.seq_len}, the dataset "
                          f"{cfg.data.dir} (data.dir) {manifest.seq_len}; write its neighbours with "
                          f"`python -m data_prep retrieval neighbours`")
    for name, got, key, want in (("chunk_len", sidecar.chunk_len, "supervisor_chunk", model_cfg.supervisor_chunk),
                                 ("neighbour_len", sidecar.neighbour_len, "retrieval_len", model_cfg.retrieval_len)):
        if got != want:
            raise ConfigError(f"model.{key}: {want}, but the sidecar {url} (data.neighbours) has {name} {got}; "
                              f"they must be equal (set model.{key}: {got}, or write neighbours with "
                              f"{name} {want})")
    try:
        NeighbourReader(url, dataset=cfg.data.dir)
    except ConfigError as exc:
        raise ConfigError(f"data.neighbours: {exc}") from None


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases, norms and embedding tables do not."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in no_decay else rest).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


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


def reset_rows(state: RecurrentState, rows: torch.Tensor, fresh: RecurrentState) -> RecurrentState:
    """``state`` with the rows where ``rows`` [B] is True replaced by ``fresh``'s (in place)."""
    if not bool(rows.any()):
        return state
    rows = rows.to(state["pos"].device)  # every causal model carries its position counter
    return state.write_(rows, fresh.select(rows))


def nonfinite_rows(state: RecurrentState) -> torch.Tensor:
    """[B] bool: rows holding a NaN or an infinity in any floating state tensor."""
    bad = None
    for value in state.to_dict().values():
        if value.is_floating_point():
            row_bad = ~torch.isfinite(value).flatten(1).all(1)
            bad = row_bad if bad is None else bad | row_bad
    return bad if bad is not None else torch.zeros(state.batch_size or 0, dtype=torch.bool)


class Trainer:
    """One process (CPU or one GPU): model, optimizer, lanes, checkpoints and metrics of a run."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.manifest = Manifest.load(cfg.data.dir)
        self.env, self.device = init_distributed(cfg.engine, resolve_device(cfg.train.device),
                                                 cfg.train.collective_timeout_min,
                                                 cpu_collectives=cfg.engine == "fsdp" and cfg.fsdp.cpu_offload)
        self.comm = Collective(self.env, self.device)
        self.dtype = resolve_dtype(cfg.train.dtype, self.device)
        self.model_cfg = resolve_model_config(cfg, self.manifest)
        check_neighbours(cfg, self.model_cfg, self.manifest)
        if self.model_cfg.arch == "nonattn" and self.model_cfg.retrieval and cfg.data.neighbours is None \
                and self.env.main:
            print("note: model.retrieval is true but data.neighbours is unset: the model trains without "
                  "retrieved text (it fuses nothing)", file=sys.stderr)
        self.seq_len = self.manifest.seq_len
        train_windows = self.manifest.split("train").windows
        try:
            self.layout = LaneLayout(train_windows, cfg.data.rows, cfg.data.rotation_seed)
            self.rows = self.layout.rank_rows(self.env.rank, self.env.world)
        except ValueError as exc:
            raise ConfigError(f"data.rows: {exc} (train split of {cfg.data.dir})") from None
        self.val_layout = self._val_layout()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        self._resume_path: Path | None | bool = False  # False: not looked up yet

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = build_model(self.model_cfg).to(self.device)
        if cfg.checkpoint.init_from:
            load_weights(model, weights_source(cfg.checkpoint.init_from), self.device)  # before any wrapping
        self.flops_per_token = model.flops_per_token(self.seq_len)  # before ZeRO-3 partitions the parameters
        self.probe = ExpertProbe(model)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.train.compile:
            apply_compile(model)
        if self.env.rank:
            torch.manual_seed(cfg.seed + self.env.rank)  # each rank its own dropout stream
        self.universal: Path | None = self._prepare_universal()
        self.engine = build_engine(model, lambda m: build_optimizer(m, cfg), cfg, self.env, self.device,
                                   load_universal=self.universal is not None)
        self.model = self.engine.module
        self.optimizer = self.engine.optimizer
        self.counters = Counters()
        self.lane_state = self.model.init_state(len(self.rows), self.device)
        self.stop_signal: int | None = None
        self.stop_agreed = False

    # ---- wiring
    def _val_layout(self) -> LaneLayout | None:
        windows = self.manifest.split("val").windows
        if windows < self.cfg.eval.rows:
            print(f"note: the val split has {windows} windows, fewer than eval.rows={self.cfg.eval.rows}: "
                  f"no validation", file=sys.stderr)
            return None
        if self.cfg.eval.rows % self.env.world:
            raise ConfigError(f"eval.rows: the {self.cfg.eval.rows} validation rows do not divide among "
                              f"{self.env.world} ranks")
        return LaneLayout(windows, self.cfg.eval.rows)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # sharded engines gather and free weights per block: autocast's cache would keep a low-precision
        # copy of every gathered weight for the whole forward
        cache = self.cfg.engine not in ("fsdp", "deepspeed")
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache)

    def train_batches(self) -> Iterator[LaneBatch]:
        """The train lanes from the current micro-step on."""
        d = self.cfg.data
        return iter(LaneLoader(d.dir, "train", self.layout, rows=self.rows, start=self.counters.micro_step,
                               workers=d.workers, prefetch=d.prefetch, neighbours=d.neighbours))

    # ---- one step
    def forward_window(self, batch: LaneBatch, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """Loss of one micro-step and the rows' state after it (state reset where the lane restarts)."""
        inputs = batch.inputs.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        # only with a sidecar: the forward of a model without retrieval takes three arguments
        extra = () if batch.neighbours is None else (batch.neighbours.to(self.device, non_blocking=True),)
        fresh = self.model.init_state(inputs.shape[0], self.device)
        state = reset_rows(state, batch.reset, fresh) if self.cfg.train.carry_state else fresh
        with self.autocast():
            out = self.engine.forward(inputs, state, inputs == self.manifest.bos_id, *extra)
        # contiguous: the same strides as init_state's, so a compiled block is not compiled twice
        carried = RecurrentState({k: v.detach().contiguous() for k, v in out.state.items()})
        return next_token_loss(out.logits, targets), carried

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
        for i, batch in enumerate(islice(batches, ga)):
            loss, self.lane_state = self.forward_window(batch, self.lane_state)
            self.engine.backward(loss, last=i == ga - 1)
            total += loss.detach()
            self.counters.micro_step += 1
            self.counters.tokens += batch.targets.numel() * self.env.world
        loss_sum, stops = self.comm.sum([float(total), float(self.stop_signal is not None)])
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
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.counters.tokens,
                "skipped_steps": self.counters.skipped_steps}

    @torch.no_grad()
    def evaluate(self, split: str = "val", rows: int | None = None, steps: int | None = None) -> dict[str, float]:
        """Mean next-token loss over ``steps`` micro-steps of ``split``'s lanes from their start, state carried.

        ``rows`` and ``steps`` default to ``eval.rows`` and ``eval.steps``; 0 (and at most) reads every window
        of the lanes once.
        """
        if split == "val" and rows is None:
            layout = self.val_layout
        else:
            layout = LaneLayout(self.manifest.split(split).windows, rows or self.cfg.eval.rows)
        mine = layout.rank_rows(self.env.rank, self.env.world)
        steps = min((self.cfg.eval.steps if steps is None else steps) or layout.lane_len, layout.lane_len)
        was_training = self.engine.training
        self.engine.train(False)
        state = self.model.init_state(len(mine), self.device)
        total, count = 0.0, 0
        loader = LaneLoader(self.cfg.data.dir, split, layout, rows=mine, neighbours=self.cfg.data.neighbours)
        for batch in islice(loader, steps):
            loss, state = self.forward_window(batch, state)
            total += float(loss) * batch.targets.numel()
            count += batch.targets.numel()
        self.engine.train(was_training)
        total, count = self.comm.sum([total, count])
        count = int(count)
        mean = total / count
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count, "windows": steps * layout.rows}

    # ---- checkpoints
    def save(self) -> Path:
        """Write checkpoint ``step-N`` (collective: every rank calls it; rank 0 seals it)."""
        step = self.counters.step
        main = self.env.main
        tmp = self.checkpointer.begin(step) if main else None
        tmp = Path(self.comm.broadcast(str(tmp) if tmp else None))
        self.engine.save(tmp)
        lanes = self.comm.gather_rows(self.lane_state.to_dict())
        rngs = self.comm.gather_objects(_rng_state(self.device))
        if main:
            save_tensors(tmp / "lanes.safetensors", lanes)
            save_tensors(tmp / "rng.safetensors",
                         {f"{name}.rank{r}": t for r, rng in enumerate(rngs) for name, t in rng.items()})
            lr = learning_rate(max(step - 1, 0), self.cfg.train.steps, self.cfg.optim)
            extra = {"zero_stage": self.engine.ds_config["zero_optimization"]["stage"]} \
                if self.cfg.engine == "deepspeed" else {}
            write_json(tmp / "trainer.json", {**self.counters.state_dict(), "lr": lr,
                                              "train_windows": self.layout.num_windows, "seq_len": self.seq_len,
                                              "engine": self.cfg.engine, "world_size": self.env.world, **extra})
            save_config(tmp / "config.yaml", self.resolved_config())
        self.comm.barrier()
        if main:
            self.checkpointer.commit(step)
        self.comm.barrier()
        return self.checkpointer.root / checkpoint_name(step)

    def load(self, path: Path) -> None:
        """Restore everything from checkpoint ``path`` (already verified); collective in a job."""
        saved = RunConfig.from_dict(load_yaml(path / "config.yaml"))
        counters = json.loads((path / "trainer.json").read_text())
        lanes = {"data.rows": (saved.data.rows, self.cfg.data.rows),
                 "data.rotation_seed": (saved.data.rotation_seed, self.cfg.data.rotation_seed),
                 "train windows": (counters.get("train_windows"), self.layout.num_windows),
                 "seq_len": (counters.get("seq_len"), self.seq_len)}
        for name, (was, now) in lanes.items():
            if was != now and not (was is None and name in ("train windows", "seq_len")):  # older trainer.json
                raise ConfigError(f"{name}: the checkpoint {path} was taken with {was}, this run has {now}; "
                                  f"its lane cursor and states would not fit (start afresh with --resume none)")
        if saved.data.neighbours != self.cfg.data.neighbours and self.env.main:
            # a moved sidecar (another URL, same files) is fine; another one changes what the model reads
            print(f"note: the checkpoint {path} was trained with data.neighbours {saved.data.neighbours}, "
                  f"this run reads {self.cfg.data.neighbours}", file=sys.stderr)
        engine = counters.get("engine", "single")
        if FORMATS[engine] != self.engine.format:
            raise ConfigError(f"engine: the checkpoint {path} was written by engine {engine}, whose files "
                              f"engine {self.cfg.engine} cannot resume; resume with engine: {engine}, or start a "
                              f"new run from its weights: --set checkpoint.init_from={path} --resume none")
        if self.universal is not None:
            self.engine.load(self.universal)
            self.comm.barrier()
            if self.env.main:
                shutil.rmtree(self.universal, ignore_errors=True)
            self.universal = None
        else:
            self.engine.load(path)
        state = load_tensors(path / "lanes.safetensors")  # every row, on the CPU: this rank takes its own
        self.lane_state = RecurrentState({k: v[self.rows.start:self.rows.stop].contiguous().to(self.device)
                                          for k, v in state.items()})
        self._load_rng(load_tensors(path / "rng.safetensors"), counters.get("world_size", 1), int(counters["step"]))
        self.counters.load_state_dict({k: v for k, v in counters.items() if k in self.counters.state_dict()})

    def _load_rng(self, rng: dict[str, torch.Tensor], saved_world: int, step: int) -> None:
        rank = self.env.rank
        if "cpu" in rng:  # written before the ranks were recorded: one process
            rng = {"cpu.rank0": rng["cpu"]}
        if saved_world != self.env.world or f"cpu.rank{rank}" not in rng:
            # another world size: a rank's stream cannot be carried over; a fresh, reproducible one
            torch.manual_seed(self.cfg.seed + 1_000_003 * step + rank)
            if self.env.main:
                print(f"note: the checkpoint was written by {saved_world} ranks, this run has {self.env.world}: "
                      f"each rank's dropout stream is seeded anew", file=sys.stderr)
            return
        torch.set_rng_state(rng[f"cpu.rank{rank}"])
        if self.device.type == "cuda" and f"cuda.rank{rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], self.device)

    def load_weights(self, path: Path) -> None:
        """The model weights of checkpoint ``path`` (any engine's) into a single-process model."""
        if self.env.world > 1 or self.cfg.engine != "single":
            self.engine.load_model_only(path)
        else:
            load_weights(self.model, path, self.device)

    def resolved_config(self) -> dict:
        data = self.cfg.to_dict()
        data["model"] = to_dict(self.model_cfg)
        return data

    # ---- the loop
    def fit(self) -> int:
        """Train to ``train.steps``; returns the exit status (0, or REQUEUE_EXIT_CODE after a signal)."""
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
        batches = self.train_batches()
        try:
            while self.counters.step < cfg.train.steps and not self.stopping():
                step = self.counters.step + 1
                log_now = step % cfg.logging.every == 0 or step == cfg.train.steps
                self.probe.active = log_now
                record = self.train_step(batches)
                self.probe.active = False
                self.metrics.log(step, self.meter.extend(record) if log_now else record)
                self.check_bad_steps(record)
                started = time.perf_counter()
                if self.val_layout is not None and _due(step, cfg.eval.every, cfg.train.steps) \
                        and not self.stopping():  # a stop asked: checkpoint within the launcher's grace period
                    result = self.evaluate()
                    self.metrics.log(step, {"val_loss": result["loss"], "val_perplexity": result["perplexity"]})
                    if self.env.main:
                        print(f"step {step}: val loss {result['loss']:.4f}, "
                              f"perplexity {result['perplexity']:.2f}", flush=True)
                if _due(step, cfg.checkpoint.every, cfg.train.steps):
                    self.save()
                    saved = step
                self.meter.last_time += time.perf_counter() - started  # tokens/s counts training time only
            if self.stopping() and self.counters.step < cfg.train.steps:
                path = self.save() if saved != self.counters.step else self.checkpointer.root / checkpoint_name(saved)
                why = f"signal {signal.Signals(self.stop_signal).name}" if self.stop_signal else "stop asked by a rank"
                print(f"{why}: checkpoint {path} written; rank {self.env.rank} "
                      f"exiting with {REQUEUE_EXIT_CODE} so the job is requeued", flush=True)
                return REQUEUE_EXIT_CODE
        finally:
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
                f"Lower optim.lr, check the data, or resume from the last checkpoint in {self.checkpointer.root}")

    def resume_path(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names (rank 0 looks, every rank gets its answer); None: afresh."""
        if self._resume_path is False:
            found, error = None, None
            if self.env.main:
                mode = self.cfg.checkpoint.resume
                try:
                    self.checkpointer.remove_partial()
                    if mode == "auto":
                        found = self.checkpointer.find_resume()
                    elif mode != "none":
                        found = resolve_checkpoint(mode)
                except (CheckpointError, OSError) as exc:
                    error = str(exc)
            # every rank learns rank 0's answer, or its error: none is left waiting in a collective
            found, error = self.comm.broadcast((str(found) if found else None, error))
            if error is not None:
                raise CheckpointError(error)
            self._resume_path = Path(found) if found else None
        return self._resume_path

    def _prepare_universal(self) -> Path | None:
        """DeepSpeed resuming a ZeRO checkpoint of another world size: its universal conversion (rank 0 writes it)."""
        if self.cfg.engine != "deepspeed":
            return None
        path = self.resume_path()
        if path is None:
            return None
        saved = json.loads((path / "trainer.json").read_text())
        if saved.get("engine") != "deepspeed":
            return None  # load() refuses another engine's checkpoint with a clear message
        was, now = saved.get("zero_stage", 0), self.cfg.deepspeed.zero_stage
        if was != now:  # DeepSpeed's loaders expect the stage's own file layout
            raise ConfigError(f"deepspeed.zero_stage: the checkpoint {path} was written with ZeRO stage {was}, this "
                              f"run has {now}; resume with zero_stage {was}, or start a new run from its weights: "
                              f"--set checkpoint.init_from={path} --resume none")
        if saved.get("world_size", 1) == self.env.world or was == 0:
            return None  # same partitioning, or ZeRO-0 (nothing partitioned)
        target = self.checkpointer.root / f".tmp-universal-{path.name}"
        if self.env.main:
            print(f"converting {path} ({saved.get('world_size')} ranks) to a universal checkpoint for "
                  f"{self.env.world} ranks", flush=True)
            shutil.rmtree(target, ignore_errors=True)
            convert_to_universal(path, target)
        self.comm.barrier()
        return target

    def resume(self) -> int | None:
        """Load the checkpoint ``checkpoint.resume`` names; returns its step, or None when starting afresh."""
        path = self.resume_path()
        if path is None:
            return None
        self.load(path)
        if self.env.main and path.parent.resolve() == self.checkpointer.root.resolve():
            self.checkpointer.point_latest(path)  # a requeue with auto continues from here, not a newer abandoned one
        if self.env.main:
            print(f"resumed from {path}: step {self.counters.step}, micro-step {self.counters.micro_step}, "
                  f"{self.counters.tokens:,} tokens, {self.env.world} rank(s)", flush=True)
        return self.counters.step

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1: finish the current step, checkpoint, exit with ``REQUEUE_EXIT_CODE``."""
        def handler(signum: int, frame: object) -> None:
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
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
                      memory_gib=t.comm.max(memory_gib(t.device)), **shared)
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


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and, on a GPU, its device's."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _due(step: int, every: int, last: int) -> bool:
    """An interval event (evaluation, checkpoint) is due after ``step``: every ``every`` steps and at the end."""
    return step == last or (every > 0 and step % every == 0)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Exit status: 0 done, 1 error, {REQUEUE_EXIT_CODE} checkpointed after SIGTERM/SIGUSR1 (requeue).")
    parser.add_argument("--config", required=True, metavar="FILE", help="run config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="auto|none|PATH",
                        help="shorthand for --set checkpoint.resume=...: auto (default) continues from "
                             "RUN/checkpoints/latest, none starts afresh, or a checkpoint directory")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    status = None
    try:
        cfg = load_run_config(args.config, overrides)
        status = Trainer(cfg).fit()
        return status
    except (ConfigError, DatasetError, CheckpointError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except pickle.UnpicklingError as exc:
        print(f"error: a checkpoint file holds more than tensors and plain data; refusing to load it: {exc}",
              file=sys.stderr)
        return 1
    finally:
        shutdown_distributed(finished=status is not None)
