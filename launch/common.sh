# Shared by launch/torchrun.sh, launch/deepspeed.sh and launch/data_prep_slurm.sh: sourced after they set SCRIPT, never run.
# shellcheck shell=bash

die() {
    echo "$SCRIPT: $*" >&2
    exit 2
}

# handle_help ARGS...: no arguments -> the script's usage on stderr, exit 2; -h / --help -> usage, exit 0.
handle_help() {
    if [[ $# -eq 0 ]]; then
        usage >&2
        exit 2
    fi
    if [[ $1 == -h || $1 == --help ]]; then
        usage
        exit 0
    fi
}

# The interpreter: the project's .venv (what `make` sets up) when it is there, else python3 on PATH.
default_python() {
    if [[ -z ${VIRTUAL_ENV:-} && -x .venv/bin/python ]]; then
        echo .venv/bin/python
    else
        echo python3
    fi
}

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

# export_rank_env RANKS_PER_NODE: OMP_NUM_THREADS (cores / ranks, at least 1, unless set) and
# TORCH_EXTENSIONS_DIR (where DeepSpeed's JIT-built ops are cached) for every rank.
export_rank_env() {
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        local cores
        cores=$(nproc)
        OMP_NUM_THREADS=$((cores / $1 > 0 ? cores / $1 : 1))
    fi
    export OMP_NUM_THREADS
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
}

# The process a stop goes to: the launcher itself (a script may define its own stop_target after sourcing).
stop_target() { echo "$child"; }

# run_forwarding_stops CMD...: run the launcher CMD in the background and wait for its real end. A
# SIGTERM, SIGUSR1 or SIGINT is passed on once, as SIGTERM, to stop_target (a second one would cut
# short the launcher's wait for its ranks to checkpoint). Exits with the launcher's status, or 75 when
# a stop was asked and the launcher ended non-zero (launchers exit 1 after a signal even when every
# rank checkpointed and exited 75).
run_forwarding_stops() {
    local shown
    printf -v shown ' %q' "$@"
    echo "+${shown}" >&2
    stop_asked=0
    stop_sent=0
    child=
    trap 'stop_asked=1; send_stop' TERM USR1 INT
    # Launchers do not handle SIGUSR1 and would die of it where a scheduler signals every process of
    # the job (srun passes USR1 on so): they start with USR1 ignored, which the ranks' own handler overrides.
    (
        trap '' USR1
        exec "$@"
    ) &
    child=$!
    send_stop # a signal that came while the launcher was being started
    local status=0
    wait "$child" || status=$?
    while kill -0 "$child" 2>/dev/null; do # wait returns early when a trapped signal arrives
        status=0
        wait "$child" || status=$?
    done
    if ((stop_asked && status != 0)); then
        exit 75
    fi
    exit "$status"
}

send_stop() {
    if ((stop_asked && !stop_sent)) && [[ -n $child ]]; then
        stop_sent=1
        local target
        target=$(stop_target)
        echo "$SCRIPT: stop asked: SIGTERM to pid $target" >&2
        kill -TERM "$target" 2>/dev/null || true
    fi
}
