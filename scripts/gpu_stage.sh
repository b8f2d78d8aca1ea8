# Sourced by the GPU training scripts (train_default_model_gpu.sh, docs/experiments/direction_experiment_gpu.sh):
# the options every GPU stage shares and `stage`, which trains one stage until its time budget and reports how it ended.
# Needs RUNS and PYTHON set; EXTRA (more --set options for every stage) is optional.

common=(--set data.in_memory=true --set optim.schedule=constant --set train.steps=1000000
        --set train.sample_every=0 --set train.checkpoint_every=2000 --set train.keep_checkpoints=1
        --set train.log_every=100 --set train.tensorboard=false --set train.progress=false
        --set train.compilation_cache=false)
read -r -a extra <<< "${EXTRA:-}"

stage() {  # stage NAME CONFIG SECONDS [--set ...]
    local name=$1 config=$2 seconds=$3
    shift 3
    echo "[$name] $(date +%T) training for ${seconds}s with $config (log: $RUNS/$name.log)"
    local status=0
    "$PYTHON" -m vldm_jax.cli train "$config" --workdir "$RUNS/$name" "${common[@]}" \
        --set train.max_seconds="$seconds" "$@" "${extra[@]}" > "$RUNS/$name.log" 2>&1 || status=$?
    echo "[$name] $(date +%T) exit $status; $(tail -n 1 "$RUNS/$name/metrics.jsonl" 2>/dev/null | cut -c1-160)"
    [ "$status" -eq 0 ] || tail -n 20 "$RUNS/$name.log" >&2
    return $status
}
