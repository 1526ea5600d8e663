#!/usr/bin/env bash
# Start `python -m pretrain` under torchrun on this node; run the same command on every node.
# A SIGTERM, SIGUSR1 or SIGINT is passed on to torchrun once as SIGTERM: every rank finishes its step,
# the ranks write one checkpoint and the script exits 75 (requeue). See launch/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/torchrun.sh CONFIG [pretrain args...]

Runs `$PYTHON -m torch.distributed.run ... -m $ENTRY --config CONFIG [pretrain args...]` on this
node, e.g. launch/torchrun.sh configs/runs/zarvan-1b.yaml --set engine=fsdp --resume auto.

Environment (default in brackets):
  NNODES                nodes in the job, each running this same command; 1 runs torchrun
                        --standalone [1]
  NPROC_PER_NODE        ranks on this node [GPUs in CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`, else 1]
  MASTER_ADDR           address of the node that hosts the c10d rendezvous (NNODES > 1) [127.0.0.1]
  MASTER_PORT           rendezvous port on MASTER_ADDR (NNODES > 1) [29500]
  RDZV_ID               rendezvous id, the same on every node of one job (NNODES > 1) [zarvan]
  PYTHON                interpreter that runs torchrun and the ranks [.venv/bin/python when present
                        and no virtualenv is active, else python3]
  OMP_NUM_THREADS       threads per rank [CPU cores / NPROC_PER_NODE, at least 1]
  TORCH_EXTENSIONS_DIR  where JIT-built extensions are cached [$PWD/.cache/torch_extensions]
  ENTRY                 module each rank runs; for tests and advanced use [pretrain]

Exit status: torchrun's own; 75 when a SIGTERM / SIGUSR1 / SIGINT stopped the run (the ranks
checkpointed: requeue the job and it resumes).
EOF
}

SCRIPT=launch/torchrun.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

handle_help "$@"

config=$1
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-zarvan}
PYTHON=${PYTHON:-$(default_python)}
ENTRY=${ENTRY:-pretrain}
for knob in NNODES NPROC_PER_NODE MASTER_PORT; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "$knob must be a positive integer, not '${!knob}'"
done

export_rank_env "$NPROC_PER_NODE"

# No --node_rank: the c10d rendezvous ignores it and numbers the nodes in their order of arrival.
if ((NNODES == 1)); then
    dist=(--standalone --nproc_per_node "$NPROC_PER_NODE")
else
    dist=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID")
fi
run_forwarding_stops "$PYTHON" -m torch.distributed.run "${dist[@]}" -m "$ENTRY" --config "$config" "$@"
