"""Stand-in for ``python -m data_prep`` in the launcher tests (an entry module, not a test).

``python -m tests.launch.stub_data_prep ARGS...``, from the repository root, appends one JSON line to
``$STUB_OUT/data_prep.jsonl``: its argv and the array element it ran in (``SLURM_ARRAY_TASK_ID``), and
exits ``$STUB_EXIT`` (default 0). It imports nothing of the project, so that it starts at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CALLS = "data_prep.jsonl"


def main(argv: list[str]) -> int:
    call = {"argv": argv, "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}
    with open(Path(os.environ["STUB_OUT"]) / CALLS, "a") as f:
        f.write(json.dumps(call) + "\n")
    return int(os.environ.get("STUB_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
