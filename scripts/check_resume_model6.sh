#!/usr/bin/env bash
# Checks that the model 6 recipe resumes (issue 22): the video6 stage at SCALE=small (8 steps) is stopped with
# SIGTERM as soon as its step-2 checkpoint exists, then the same command runs again; it must resume and finish.
#   RUNS=runs/shapes6r scripts/check_resume_model6.sh      # prints what happened; logs in RUNS/
set -uo pipefail
cd "$(dirname "$0")/.."
export NICE=${NICE:-0} SCALE=small RUNS=${RUNS:-runs/shapes6r} STEPS6=${STEPS6:-8}
mkdir -p "$RUNS"
scripts/train_default_model.sh video6 > "$RUNS/first.out" 2>&1 &
script_pid=$!
while [ ! -d "$RUNS/video6/checkpoints/2" ]; do
    kill -0 "$script_pid" 2>/dev/null || { echo "the first run ended before its step-2 checkpoint" >&2; exit 1; }
    sleep 1
done
py=$(pgrep -P "$script_pid" -f "vldm_jax.cli train")
echo "$(date -u +%T) stopping training process $py"
kill -TERM "$py"
wait "$script_pid"
echo "first run: exit $? ($(tail -n 1 "$RUNS/first.out"))"
scripts/train_default_model.sh video6 > "$RUNS/second.out" 2>&1
status=$?
echo "second run: exit $status; $(grep -h 'resuming\|trained to' "$RUNS/video6.log" | tr '\n' ' ')"
exit $status
