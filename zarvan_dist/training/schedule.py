"""The learning rate as a pure function of the optimizer step (so a resumed run needs no scheduler state)."""

from __future__ import annotations

import math

from zarvan_dist.training.config import OptimConfig


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a run of ``total_steps`` steps.

    Warmup rises linearly from lr / (warmup + 1) to lr over ``warmup_steps`` steps; then
    ``cosine`` decays to ``min_lr`` by the last step, ``wsd`` holds lr and decays linearly to
    ``min_lr`` over the last ``decay_fraction`` of the steps, ``constant`` holds lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    last = max(total_steps - 1, cfg.warmup_steps)
    if cfg.schedule == "cosine":
        span = max(last - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_start = max(cfg.warmup_steps, total_steps - round(cfg.decay_fraction * total_steps))
    if step < decay_start:
        return cfg.lr
    progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress
