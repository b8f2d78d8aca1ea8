#!/usr/bin/env bash
# One lent-GPU session (issue 7, plus the GPU checks of issue 8): preflight, the default model's stages 2-4
# (scripts/train_default_model_gpu.sh) inside a deadline, scripts/gpu_check.py, and the results under $OUT.
#
#   OUT=/tmp/out DEADLINE=450 docs/experiments/gpu_session.sh
#
# The machine's own python3 (JAX with CUDA, PyTorch) runs the repository in place. If the preflight test fails
# with its packages, the flax/optax/orbax wheels carried in .whl/ (the versions CI tests) are tried instead;
# diffusers (not on that machine) comes from .whl/ for gpu_check.py only.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHON=python3
OUT=${OUT:?set OUT}
RUNS=${RUNS:-/tmp/runs}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as oc, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__, jax.devices())"

preflight() {
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/train/test_image_objectives.py \
        -k "in_memory or render_arrays" 2>&1 | tail -n 15
}
log "preflight with the machine's packages"
if ! preflight; then
    log "preflight failed: trying the carried flax/optax/orbax wheels"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/flax-*.whl .whl/optax-*.whl .whl/orbax_checkpoint-*.whl
    export PYTHONPATH=/tmp/site
    preflight || { log "preflight failed again: stopping"; exit 1; }
fi

# Send each finished stage back as soon as it exists (a call cut off at its limit still returns them).
(
    for _ in $(seq 200); do [ -e "$RUNS/image/export/pipeline/model_index.json" ] && break; sleep 3; done
    [ -e "$RUNS/image/export/pipeline/model_index.json" ] || exit 0
    sleep 2
    tar -C "$RUNS/image/export/pipeline" -cf "$OUT/image_pipeline.tar" unet text_encoder scheduler model_index.json
    log "image pipeline packed: $(du -h "$OUT/image_pipeline.tar" | cut -f1)"
) &

log "training (deadline ${DEADLINE:-450}s)"
RUNS=$RUNS DEADLINE=${DEADLINE:-450} IMAGE_SECONDS=${IMAGE_SECONDS:-190} scripts/train_default_model_gpu.sh
status=$?
log "training exit $status"
for stage in video interpolation; do
    [ -e "$RUNS/$stage/temporal.safetensors" ] && cp "$RUNS/$stage/temporal.safetensors" "$OUT/${stage}_temporal.safetensors"
done
tar -C "$RUNS" -czf "$OUT/logs.tgz" --exclude=checkpoints --exclude=export --exclude='*.safetensors' --exclude=cache . \
    2>/dev/null
log "packed: $(ls "$OUT" | tr '\n' ' ')"

left=$(( ${BUDGET:-570} - ($(date +%s) - T0) - 10 ))
if [ "$left" -gt 30 ]; then
    log "gpu_check for at most ${left}s"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/diffusers \
        .whl/diffusers-*.whl
    PYTHONPATH=$PWD:${PYTHONPATH:+$PYTHONPATH:}/tmp/diffusers timeout "$left" python3 scripts/gpu_check.py \
        --out "$OUT/gpu_check.json" --reps 20 2>&1 | grep -v "should be kept in float32" | cut -c1-400
fi
log "end"
exit $status
