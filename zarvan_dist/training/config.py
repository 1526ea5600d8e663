"""The run configuration: one small dataclass per concern, loaded from YAML with ``--set`` overrides.

A run config names its model inline (``model:``) or by file (``model_file:``, whose keys the
inline ``model:`` mapping then overrides). ``load_run_config`` resolves it into a ``RunConfig``;
``RunConfig.to_dict`` is what a run writes to ``RUN/config.yaml`` and to every checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from zarvan_dist.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from zarvan_dist.data import Manifest, NeighbourManifest, NeighbourReader
from zarvan_dist.models.config import ModelConfig


EngineName = Literal["single", "ddp", "fsdp", "deepspeed"]
ENGINES: tuple[str, ...] = get_args(EngineName)
"""How a model can be wrapped for training (``zarvan_dist.training.engines``)."""


_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class SourceConfig:
    """One dataset of a mixture (``data.sources``)."""

    dir: str
    """fsspec URL of the dataset written by ``data_prep shards`` (its directory)."""
    weight: float = 1.0
    """Share of the global batch's rows (relative to the other sources' weights); must be positive."""
    name: str = ""
    """Name in the metrics (``tokens/<name>``, ``loss/<name>``, ``val_loss/<name>``); default: the
    directory's last path component. Letters, digits, '_', '.', '-'."""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.dir.rstrip("/").rsplit("/", 1)[-1]
        if not _SOURCE_NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} is not a metric name (letters, digits, '_', '.', '-')")
        if not self.weight > 0:  # also NaN
            raise ConfigError(f"weight: source {self.name} has weight {self.weight}; a weight must be positive "
                              f"(leave the source out to not read it)")


DEFAULT_DATA_DIR = "data/quickstart"


@dataclass
class DataConfig:
    """Where the shards are and how the lanes read them."""

    dir: str = DEFAULT_DATA_DIR
    """fsspec URL of the dataset written by ``data_prep shards`` (its directory): the one-source shorthand.
    With ``sources`` it is the first source's directory (set for you; another value is an error)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture: datasets of one tokenizer and seq_len, each with a weight and a name; the global rows are
    dealt to them in proportion to the weights (``zarvan_dist.data.mixture``). Empty: ``dir`` alone."""
    rows: int = 8
    """G, rows of the global batch; row j streams lane j of the train split."""
    workers: int = 1
    """DataLoader worker processes reading the shards (0 reads in the training process)."""
    prefetch: int = 4
    """Micro-steps each worker reads ahead."""
    rotation_seed: int | None = 0
    """Seed of the per-epoch lane offset (so no window is skipped every epoch); null: no rotation."""
    neighbours: str | None = None
    """fsspec URL of the neighbour sidecar of ``dir`` (retrieval; written by ``python -m data_prep retrieval
    neighbours``, by default to DIR/retrieval/neighbours): each window is fed the retrieved text of its
    chunks. Needs model arch nonattn with retrieval: true; null: no retrieved text."""

    def __post_init__(self) -> None:
        _positive(self, "rows", "prefetch")
        if self.workers < 0:
            raise ConfigError(f"workers: expected a non-negative integer, got {self.workers}")
        if self.sources:
            if self.dir not in (DEFAULT_DATA_DIR, self.sources[0].dir):
                raise ConfigError(f"dir: {self.dir!r} with sources: give data.dir (one dataset) or data.sources "
                                  f"(a mixture), not both")
            self.dir = self.sources[0].dir
            names = [s.name for s in self.sources]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ConfigError(f"sources: the name {twice[0]!r} is given to more than one source; set name: "
                                  f"to tell them apart")
            if self.neighbours is not None:
                raise ConfigError("neighbours: retrieval reads the sidecar of one dataset; it is not supported "
                                  "with data.sources")

    @property
    def mixture(self) -> list[SourceConfig]:
        """The sources read: ``sources``, or ``dir`` as the one source of weight 1."""
        return self.sources or [SourceConfig(dir=self.dir, name="data")]


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 100
    """Optimizer steps of the whole run."""
    grad_accum: int = 1
    """Micro-steps per optimizer step: consecutive windows of the same lanes."""
    carry_state: bool = True
    """Carry each row's recurrent state to its next window (false: reset every window, an ablation)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype: auto is bfloat16 on GPUs that support it, float32 elsewhere."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    compile: bool = False
    """Compile the model with torch.compile."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps (loss or gradient norm) that stop the run."""
    device: str = "auto"
    """Device to train on: auto (cuda when available, else cpu), cpu, cuda, cuda:N (one process only)."""
    collective_timeout_min: float = 60.0
    """Minutes a rank waits in a collective before the job fails (rank 0 alone hashes and seals each
    checkpoint and converts DeepSpeed checkpoints on a world-size change: raise it for very large models)."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "grad_accum", "max_bad_steps")
        if self.collective_timeout_min <= 0:
            raise ConfigError(f"collective_timeout_min: expected a positive number, got {self.collective_timeout_min}")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay and a learning rate that is a pure function of the step."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine decay to min_lr; wsd: warmup, stable, then linear decay; constant."""
    warmup_steps: int = 10
    """Steps of linear warmup, from lr / (warmup_steps + 1) up to lr."""
    decay_fraction: float = 0.2
    """wsd: the share of the steps (at the end) spent decaying to min_lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (biases, norms and embeddings are not decayed)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: expected a positive number, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr: expected a value in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: expected a non-negative integer, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction: expected a value in (0, 1], got {self.decay_fraction}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two values in [0, 1), got {self.betas}")
        for name in ("grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a non-negative number, got {getattr(self, name)}")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which one a run resumes from."""

    every: int = 100
    """Write a checkpoint every this many optimizer steps (and always at the end); 0: only at the end."""
    keep: int = 3
    """Checkpoints kept on disk (the newest); older ones are deleted."""
    resume: str = "auto"
    """auto: continue from RUN/checkpoints/latest when there is one; none: start afresh; or a checkpoint path."""
    init_from: str | None = None
    """Weights to start a new run from: any engine's checkpoint (or run directory) or a ``pretrain.export``
    directory; optimizer, lanes and counters start afresh. A resumed run takes its checkpoint's weights instead."""
    allow_other_data: bool = False
    """Resume although the dataset's manifest is not the one the checkpoint was trained on (its sha256 is in
    trainer.json): each lane goes on at its window index in the new dataset."""
    resume_reweight: bool = False
    """Resume although ``data.sources`` (names, directories or weights) differ from the checkpoint's: weights,
    optimizer and counters come from the checkpoint, the new lanes start from their beginning with fresh
    recurrent states (CLI: ``--resume-reweight``)."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"every: expected a non-negative integer, got {self.every}")
        _positive(self, "keep")


@dataclass
class EvalConfig:
    """Validation over the val split's own lanes, state carried from window to window."""

    every: int = 50
    """Evaluate every this many optimizer steps (and at the end); 0: only at the end."""
    rows: int = 4
    """Rows (lanes) of the validation batch."""
    steps: int = 0
    """Micro-steps per evaluation, each from the val lanes' start; 0: every window of the lanes once."""

    def __post_init__(self) -> None:
        for name in ("every", "steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a non-negative integer, got {getattr(self, name)}")
        _positive(self, "rows")


@dataclass
class LoggingConfig:
    """Console, ``RUN/metrics.jsonl`` and TensorBoard."""

    every: int = 10
    """Log every this many optimizer steps (metrics.jsonl has every step's loss regardless)."""
    tensorboard: bool = True
    """Write TensorBoard event files under RUN/tensorboard."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; null: looked up for known GPUs, MFU not logged otherwise."""
    progress: bool = True
    """Print a console progress line with the ETA at each log step."""

    def __post_init__(self) -> None:
        _positive(self, "every")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"peak_tflops: expected a positive number or null, got {self.peak_tflops}")


@dataclass
class FSDPConfig:
    """``engine: fsdp``: FSDP2 ``fully_shard`` on every block and the root."""

    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy)."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (ZeRO-3-like); false keeps them until backward."""


@dataclass
class DeepSpeedConfig:
    """``engine: deepspeed``: the ZeRO stage and offload; a full DeepSpeed config file may be given as a base."""

    zero_stage: int = 1
    """ZeRO stage: 0 (data parallel), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Optimizer state and update on the CPU (ZeRO-Offload)."""
    offload_params: bool = False
    """Parameters in CPU memory between uses (ZeRO-3 only)."""
    config: str | None = None
    """A DeepSpeed config file (JSON or YAML, relative to the run config) whose keys are the base; batch sizes,
    accumulation and clipping are always the run config's."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class RunConfig:
    """Everything a training run needs; its resolved form is saved with every checkpoint."""

    run_dir: str
    """Directory of the run: config.yaml, checkpoints/, tensorboard/, metrics.jsonl."""
    model: ModelConfig
    """The model (vocab_size is taken from the dataset's tokenizer)."""
    seed: int = 0
    """Seed of the weight initialisation and of dropout."""
    engine: EngineName = "single"
    """How the model is wrapped: single (one process, CPU or one GPU), ddp, fsdp (FSDP2) or deepspeed (ZeRO)."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP2 options (engine: fsdp)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed options (engine: deepspeed)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The shards and the lanes."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Monitoring."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the inverse of ``from_dict``)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from plain data; errors name the key."""
        return from_dict(cls, data)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config, apply ``key=value`` overrides, resolve ``model_file``.

    ``model_file`` is a path relative to the run config's directory (or absolute); its keys are
    the model's defaults, which an inline ``model:`` mapping overrides. Overrides may set
    ``model_file`` and ``model.*`` keys too.
    """
    path = Path(path)
    data = apply_overrides(load_yaml(path), overrides or [])
    model_file = data.pop("model_file", None)
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: model: expected a mapping, got {model!r}")
    if model_file is not None:
        if not isinstance(model_file, str):
            raise ConfigError(f"{path}: model_file: expected a path, got {model_file!r}")
        base = Path(model_file)
        if not base.is_absolute():
            base = path.parent / base
        model = {**load_yaml(base), **model}
    data["model"] = model
    ds = data.get("deepspeed")
    if isinstance(ds, dict) and isinstance(ds.get("config"), str) and not Path(ds["config"]).is_absolute():
        data["deepspeed"] = {**ds, "config": str(path.parent / ds["config"])}
    try:
        return RunConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value}")


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
