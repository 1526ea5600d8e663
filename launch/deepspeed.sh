#!/usr/bin/env bash
# Start `python -m pretrain --set engine=deepspeed` under the deepspeed launcher.
# A SIGTERM, SIGUSR1 or SIGINT is passed on once as SIGTERM to the ranks: every rank finishes its
# step, the ranks write one checkpoint and the script exits 75 (requeue). See launch/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/deepspeed.sh CONFIG [pretrain args...]

Runs `$PYTHON -m deepspeed.launcher.runner ... --module $ENTRY --config CONFIG --set engine=deepspeed
[pretrain args...]`, e.g. launch/deepspeed.sh configs/runs/zarvan-1b.yaml --set deepspeed.zero_stage=2.

Environment (default in brackets):
  HOSTFILE              MPI-style hostfile (`host slots=8` per line); unset: this node only
  NUM_NODES             use the first NUM_NODES hosts of HOSTFILE [all]
  NUM_GPUS              ranks per node, ids 0..NUM_GPUS-1; on CPU this is how to ask for
                        several local ranks [every GPU; 1 on CPU]
  NODE_RANK             run only this node's ranks, without ssh (--no_ssh): start the same command
                        on every host of HOSTFILE with its index; needs MASTER_ADDR [unset: ssh
                        from this node to every host through pdsh]
  MASTER_ADDR           address of the first host [127.0.0.1 without HOSTFILE; else found by
                        ssh to the first host]
  MASTER_PORT           torch.distributed port on MASTER_ADDR [29500]
  PYTHON                interpreter that runs the launcher and the ranks [.venv/bin/python when present
                        and no virtualenv is active, else python3]
  OMP_NUM_THREADS       threads per rank [CPU cores / ranks per node, at least 1]
  TORCH_EXTENSIONS_DIR  where deepspeed's JIT-built ops are cached [$PWD/.cache/torch_extensions]
  ENTRY                 module each rank runs; for tests and advanced use [pretrain]

Exit status: the launcher's own; 75 when a SIGTERM / SIGUSR1 / SIGINT stopped the run (the ranks
checkpointed: requeue the job and it resumes).
EOF
}

SCRIPT=launch/deepspeed.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

handle_help "$@"

config=$1
shift
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-$(default_python)}
ENTRY=${ENTRY:-pretrain}

resources=()
if [[ -n ${HOSTFILE:-} ]]; then
    [[ -f $HOSTFILE ]] || die "HOSTFILE $HOSTFILE is not a file"
    resources+=(--hostfile "$HOSTFILE")
else
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
if [[ -n ${NUM_GPUS:-} ]]; then
    resources+=(--num_gpus "$NUM_GPUS")
fi
if [[ -n ${NUM_NODES:-} ]]; then
    resources+=(--num_nodes "$NUM_NODES")
fi
if [[ -n ${NODE_RANK:-} ]]; then
    [[ -n ${HOSTFILE:-} && -n ${MASTER_ADDR:-} ]] || die "NODE_RANK needs HOSTFILE and MASTER_ADDR"
    resources+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [[ -n ${MASTER_ADDR:-} ]]; then
    resources+=(--master_addr "$MASTER_ADDR")
fi

export_rank_env "${NUM_GPUS:-$(gpu_count)}"

# Which process takes the stop: on one node (and with NODE_RANK) runner.py has no signal handler,
# so a SIGTERM would kill it and orphan its child `python -u -m deepspeed.launcher.launch` and the
# ranks; that child, though, sends SIGTERM to every rank and waits 30 s for them. Across nodes the
# child is pdsh (whose command line names the launch module too, hence the anchored pattern) and
# runner.py handles SIGTERM itself: it signals pdsh and `pkill -f`s the ranks on every host, then
# exits after about a second, without waiting for the remote ranks to checkpoint.
stop_target() {
    pgrep -P "$child" -f '^[^ ]+ -u -m deepspeed\.launcher\.launch ' 2>/dev/null || echo "$child"
}

run_forwarding_stops "$PYTHON" -m deepspeed.launcher.runner --no_local_rank "${resources[@]}" \
    --master_port "$MASTER_PORT" --module "$ENTRY" --config "$config" --set engine=deepspeed "$@"
