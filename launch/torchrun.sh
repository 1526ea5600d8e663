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
  PYTHON                interpreter that runs torchrun and the ranks [python3]
  OMP_NUM_THREADS       threads per rank [CPU cores / NPROC_PER_NODE, at least 1]
  TORCH_EXTENSIONS_DIR  where JIT-built extensions are cached [$PWD/.cache/torch_extensions]
  ENTRY                 module each rank runs; for tests and advanced use [pretrain]

Exit status: torchrun's own; 75 when a SIGTERM / SIGUSR1 / SIGINT stopped the run (the ranks
checkpointed: requeue the job and it resumes).
EOF
}

die() {
    echo "launch/torchrun.sh: $*" >&2
    exit 2
}

if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
fi
if [[ $1 == -h || $1 == --help ]]; then
    usage
    exit 0
fi

# GPUs this node may use: the ones CUDA_VISIBLE_DEVICES names, else all that nvidia-smi lists, else 1.
gpu_count() {
    local n=0
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local -a ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        n=${#ids[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    echo $((n > 0 ? n : 1))
}

config=$1
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-zarvan}
PYTHON=${PYTHON:-python3}
ENTRY=${ENTRY:-pretrain}
for knob in NNODES NPROC_PER_NODE MASTER_PORT; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "$knob must be a positive integer, not '${!knob}'"
done

if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cores=$(nproc)
    OMP_NUM_THREADS=$((cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1))
fi
export OMP_NUM_THREADS
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

# No --node_rank: the c10d rendezvous ignores it and numbers the nodes in their order of arrival.
if ((NNODES == 1)); then
    dist=(--standalone --nproc_per_node "$NPROC_PER_NODE")
else
    dist=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID")
fi
cmd=("$PYTHON" -m torch.distributed.run "${dist[@]}" -m "$ENTRY" --config "$config" "$@")
printf -v shown ' %q' "${cmd[@]}"
echo "+${shown}" >&2

# The stop is passed on once: a second SIGTERM would cut short torchrun's 30 s wait for its ranks.
stop_asked=0
stop_sent=0
child=
send_stop() {
    if ((stop_asked && !stop_sent)) && [[ -n $child ]]; then
        stop_sent=1
        echo "launch/torchrun.sh: stop asked: SIGTERM to torchrun (pid $child)" >&2
        kill -TERM "$child" 2>/dev/null || true
    fi
}
trap 'stop_asked=1; send_stop' TERM USR1 INT
# torchrun does not handle SIGUSR1 and would die of it where a scheduler signals every process of
# the job (srun passes USR1 on so): it starts with USR1 ignored, which the ranks' own handler overrides.
(
    trap '' USR1
    exec "${cmd[@]}"
) &
child=$!
send_stop # a signal that came while torchrun was being started

status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do # wait returns early when a trapped signal arrives
    status=0
    wait "$child" || status=$?
done
# torchrun exits 1 after a signal even when every rank checkpointed and exited 75.
if ((stop_asked && status != 0)); then
    exit 75
fi
exit "$status"
