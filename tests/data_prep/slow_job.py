"""A data_prep job slowed down for the kill/resume tests (imported by them, and run by them as a script).

    python tests/data_prep/slow_job.py SECONDS JOB ARGS...    (JOB ARGS as for ``python -m data_prep``)

runs the job with its journal writer, ``data_prep.storage.save_journal``, wrapped to sleep SECONDS after
each journal that records a finished output (the retrieval jobs), and its file writer,
``data_prep.storage.put_stream_atomic``, wrapped to sleep SECONDS after each token shard it puts in place
(the shards job), so a test can SIGKILL the job at a known point. The jobs themselves are unchanged: they
import the wrapped writers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def slow_command(seconds: float, args: list[str]) -> list[str]:
    """The command line running ``python -m data_prep ARGS`` slowed by ``seconds`` after each recorded output."""
    return [sys.executable, str(Path(__file__).resolve()), str(seconds), *args]


def recorded(journal: dict[str, Any]) -> int:
    """Finished outputs a job's journal records: dataset shards (shards job, per split), embeddings shards
    (embed), index parts (index) or neighbour shards (neighbours, per split)."""
    return (sum(len(journal[split]["shards"]) for split in ("train", "val") if split in journal)
            + len(journal.get("shards", [])) + len(journal.get("parts", []))
            + sum(len(shards) for shards in journal.get("splits", {}).values()))


def main(seconds: float, argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))  # as for ``python -m data_prep`` run in the repository
    from data_prep import storage

    save, put = storage.save_journal, storage.put_stream_atomic

    def save_slowly(fs, root: str, state: dict[str, Any]) -> None:
        save(fs, root, state)
        if recorded(state):
            time.sleep(seconds)

    def put_slowly(fs, path: str, blocks) -> tuple[int, str]:
        written = put(fs, path, blocks)
        if path.rsplit("/", 1)[-1].startswith("shard-"):
            time.sleep(seconds)
        return written

    # before the jobs are imported, so that each binds the slow writers
    storage.save_journal, storage.put_stream_atomic = save_slowly, put_slowly
    from data_prep import chunks, faiss_index, retrieval, shards
    from data_prep.__main__ import main as run_job

    assert all(job.save_journal is save_slowly for job in (chunks, faiss_index, retrieval))
    assert shards.put_stream_atomic is put_slowly
    return run_job(argv)


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]), sys.argv[2:]))
