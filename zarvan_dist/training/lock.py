"""The run-directory lock: one trainer writes a run directory at a time.

``RUN/trainer.lock`` holds the holder's host, pid, SLURM job id (if any) and start time. It is created
atomically (``O_CREAT | O_EXCL``) by the job's rank 0 before anything in the run directory is written,
and removed when the trainer ends. A second trainer on the same run directory is refused with a
message naming the holder. A lock whose holder is gone is taken over: on the same host when its pid
no longer runs, anywhere when it belongs to this very SLURM job (a requeue after the node died). A
lock left on another host by a process that cannot be checked from here is refused unless the user
says it is stale (``python -m pretrain --break-lock``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_FILE = "trainer.lock"


class RunLockedError(RuntimeError):
    """Another trainer holds the run directory."""


class RunLock:
    """The lock of run directory ``run_dir`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    @staticmethod
    def me() -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock, taking over one whose holder is gone (or any, with ``break_lock``); a
        RunLockedError naming the holder when another trainer has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder that ends, or another taker, between the look and the take
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if not (break_lock or self._gone(holder)):
                    raise RunLockedError(self._refusal(holder)) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me()) + "\n")
            self.held = True
            return
        raise RunLockedError(f"{self.path}: could not take the lock (another trainer keeps taking it)")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        holder = self.holder() if self.held else {}
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # a lock file being written, or damaged: treated as held by an unknown process

    def _gone(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if pid == os.getpid():
                return True  # this process (a Trainer built again in it)
            return isinstance(pid, int) and not _alive(pid)
        job = os.environ.get("SLURM_JOB_ID")
        return job is not None and holder.get("slurm_job_id") == job  # this job's previous run, requeued

    def _refusal(self, holder: dict[str, Any]) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
               + (f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "")) \
            if holder else "an unknown process (the lock file is unreadable)"
        here = holder.get("host") == socket.gethostname()
        hint = ("stop that trainer first" if here else
                "if no trainer runs there any more, the lock is stale: pass --break-lock to take it over")
        return f"{self.path.parent} is in use by another trainer ({who}): {hint}; or train into another run_dir"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
