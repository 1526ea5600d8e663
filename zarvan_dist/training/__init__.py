"""Training components: run config, learning-rate schedule, checkpoints and metrics."""
