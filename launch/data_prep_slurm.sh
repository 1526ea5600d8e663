#!/usr/bin/env bash
# Submit `python -m data_prep shards` to SLURM as a job array of launch/data_prep.sbatch, and the
# merge as a job that starts once every element of the array has succeeded. See launch/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/data_prep_slurm.sh [SBATCH_OPTION... --] DATA_PREP_ARGS...

Submits `sbatch --array=0-M launch/data_prep.sbatch DATA_PREP_ARGS`, whose elements run the NUM_TASKS
tasks of `python -m data_prep shards DATA_PREP_ARGS` (K tasks each), then
`sbatch --dependency=afterok:ARRAY_JOB launch/data_prep.sbatch merge --out OUT`, with OUT the
--out of DATA_PREP_ARGS, and prints both job ids. Run it from the repository root, e.g.
  NUM_TASKS=64 ARRAY_SIZE=8 launch/data_prep_slurm.sh --partition=cpu -- \
      --tokenizer data/tokenizer.model --out /shared/data/web --seq-len 1024 --input /shared/corpus
SBATCH_OPTIONs, before a `--`, go to both sbatch calls (the options the script sets win). Run the
same command again after a failure: the tasks that have finished are skipped.

Environment (default in brackets):
  NUM_TASKS    tasks the job is split into; keep it for every submission to one OUT [required]
  ARRAY_SIZE   array elements, one machine each; K = ceil(NUM_TASKS / ARRAY_SIZE) [NUM_TASKS]
  ARRAY_LIMIT  elements running at once (--array=0-M%ARRAY_LIMIT) [no limit]
PYTHON and ENTRY reach the jobs as launch/data_prep.sbatch describes.
EOF
}

SCRIPT=launch/data_prep_slurm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_help "$@"

sbatch_opts=()
for arg in "$@"; do
    if [[ $arg == -- ]]; then
        while [[ $1 != -- ]]; do
            sbatch_opts+=("$1")
            shift
        done
        shift
        break
    fi
done
(($# > 0)) || die "no data_prep arguments after --"

[[ -n ${NUM_TASKS:-} ]] || die "set NUM_TASKS to the number of tasks, e.g. NUM_TASKS=64 launch/data_prep_slurm.sh ..."
ARRAY_SIZE=${ARRAY_SIZE:-$NUM_TASKS}
for knob in NUM_TASKS ARRAY_SIZE ${ARRAY_LIMIT:+ARRAY_LIMIT}; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "$knob must be a positive integer, not '${!knob}'"
done
out=
prev=
for arg in "$@"; do # the last --out, as argparse takes it
    [[ $prev == --out ]] && out=$arg
    [[ $arg == --out=* ]] && out=${arg#--out=}
    prev=$arg
done
[[ -n $out ]] || die "no --out among the data_prep arguments: the merge job needs it"

per_job=$(((NUM_TASKS + ARRAY_SIZE - 1) / ARRAY_SIZE))
elements=$(((NUM_TASKS + per_job - 1) / per_job)) # no element without tasks
script=$(dirname "${BASH_SOURCE[0]}")/data_prep.sbatch
mkdir -p logs # the #SBATCH --output of launch/data_prep.sbatch

# submit SBATCH_ARGS...: sbatch --parsable; prints the job id.
submit() {
    local shown reply
    printf -v shown ' %q' sbatch --parsable "$@"
    echo "+${shown}" >&2
    reply=$(sbatch --parsable "$@")
    reply=${reply%%;*} # "id;cluster" on a multi-cluster setup
    [[ $reply =~ ^[0-9]+$ ]] || {
        echo "launch/data_prep_slurm.sh: sbatch answered '$reply', not a job id" >&2
        return 1
    }
    echo "$reply"
}

array_job=$(submit ${sbatch_opts[@]+"${sbatch_opts[@]}"} --export="ALL,NUM_TASKS=$NUM_TASKS,TASKS_PER_JOB=$per_job" \
    --array="0-$((elements - 1))${ARRAY_LIMIT:+%$ARRAY_LIMIT}" "$script" "$@")
echo "array job $array_job: tasks 0-$((NUM_TASKS - 1)) on $elements elements, $per_job per element"
merge_job=$(submit ${sbatch_opts[@]+"${sbatch_opts[@]}"} --export=ALL --dependency="afterok:$array_job" \
    --kill-on-invalid-dep=yes --job-name=data-prep-merge --cpus-per-task=1 --output=logs/%x-%j.out \
    "$script" merge --out "$out") || {
    printf -v shown ' %q' sbatch --export=ALL --dependency="afterok:$array_job" "$script" merge --out "$out"
    echo "launch/data_prep_slurm.sh: array job $array_job is submitted but its merge is not: run$shown" >&2
    exit 1
}
echo "merge job $merge_job: data_prep merge --out $out once array job $array_job has succeeded"
