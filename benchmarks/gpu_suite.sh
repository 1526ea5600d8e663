#!/usr/bin/env bash
# One-shot GPU suite (see benchmarks/gpu_suite.py --help): needs only torch and this repository.
#   bash benchmarks/gpu_suite.sh [--out DIR] [more gpu_suite.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_suite.py "$@"
