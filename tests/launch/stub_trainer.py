"""Stand-in for ``python -m pretrain`` in the launcher tests (an entry module, not a test).

``python -m tests.launch.stub_trainer --config MODE [args...]``, from the repository root, writes
``$STUB_OUT/rank-R.ready`` (JSON: the distributed env and argv) and then, by MODE: ``done`` exits 0,
``fail`` exits 3, ``wait`` sleeps until SIGTERM / SIGUSR1, then takes ``CHECKPOINT_S`` to "checkpoint",
writes ``rank-R.stopped`` and exits 75, as the trainer does. It imports no torch, so that a rank
starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 75
CHECKPOINT_S = 1.0
"""A stopped rank's checkpoint time: a launcher that does not wait for its ranks exits before the
stop files exist."""
ORPHAN_EXIT_CODE = 4
MAX_WAIT_S = 120.0
"""A waiting rank gives up after this long, so a broken test leaves no process behind."""

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "SLURM_NODEID")


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary name so that a polling test never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str]) -> int:
    mode = argv[argv.index("--config") + 1]
    out = Path(os.environ["STUB_OUT"])
    rank = os.environ["RANK"]
    stopped = out / f"rank-{rank}.stopped"

    def stop(signum, frame):
        time.sleep(CHECKPOINT_S)
        write_atomic(stopped, signal.Signals(signum).name)
        sys.exit(REQUEUE_EXIT_CODE)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)
    ready = {"env": {key: os.environ.get(key) for key in ENV_KEYS}, "argv": argv, "pid": os.getpid()}
    write_atomic(out / f"rank-{rank}.ready", json.dumps(ready))
    if mode == "done":
        return 0
    if mode == "fail":
        return 3
    parent = os.getppid()
    deadline = time.monotonic() + MAX_WAIT_S
    while time.monotonic() < deadline:
        if os.getppid() != parent:  # the launcher died without stopping this rank
            return ORPHAN_EXIT_CODE
        time.sleep(0.1)
    return ORPHAN_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
