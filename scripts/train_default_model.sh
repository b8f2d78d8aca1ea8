#!/usr/bin/env bash
# Trains vldm_jax's bundled moving-shapes model from scratch, stage by stage, on a CPU (issue 7).
#
#   scripts/train_default_model.sh            # every stage, in order
#   scripts/train_default_model.sh vae image  # only these stages (each still needs the ones before it)
#
# Each stage trains in runs/shapes/<stage>/ (orbax checkpoints, metrics.jsonl, sample GIFs) and logs to
# runs/shapes/<stage>.log. A stage whose export (runs/shapes/<stage>/export) exists is skipped; a stage that
# was stopped (SIGTERM, a closed session, a kill) resumes from its last checkpoint when the script runs again.
# Environment: RUNS (default runs/shapes), NICE (default 19), PYTHON (default python).
# Stages and what they write (see docs/default_model.md for wall times and measured quality):
#   vae     configs/shapes/vae.yaml    -> runs/shapes/vae/export/vae             (AutoencoderKL, 64x64 -> 16x16x4)
#   image   configs/shapes/image.yaml  -> runs/shapes/image/export/pipeline      (image LDM + text encoder)
#   decoder configs/shapes/vae_decoder.yaml -> runs/shapes/vae_decoder/export/vae (decoder fine-tuned on noisy
#           latents; same encoder and scaling_factor, so it replaces the pipeline's VAE)
#   video   configs/shapes/video.yaml  -> runs/shapes/video/temporal.safetensors (key-frame + prediction model)
#   interpolation configs/shapes/interpolation.yaml -> runs/shapes/interpolation/temporal.safetensors (x4)
#   assemble  scripts/assemble_default_model.py -> vldm_jax/assets/default_model (the shipped pipeline folder)
#
# Model 6 (issue 22): the video stages continued from the shipped model 5 on the varied renderer
# (moving_shapes:N:varied: sizes 8-24 px, positions, speeds, outlines, background noise; the held_out setting is
# kept for evaluation), clips rendered into memory (no TensorFlow):
#   video6         key-frame/prediction model from model 5's (BASE/unet)  -> RUNS/video6/temporal.safetensors
#   interpolation6 x4 interpolation from model 5's (BASE/interpolator)    -> RUNS/interpolation6/temporal.safetensors
#   assemble6      model 5 with both sets of temporal layers replaced     -> RUNS/model6 (a pipeline folder; copy it
#                  over vldm_jax/assets/default_model to ship it)
# SCALE picks the size: small (default: 64 clips, 4 steps at batch 1, a checkpoint every 2 steps: a CPU check that
# the recipe runs end to end and resumes, not a model) or full (20000 clips, 3000 steps at batch 32: a GPU's job,
# see docs/default_model.md "Model 6: what remains"). STEPS6, EXAMPLES6, BATCH6 override the scale's numbers;
# MAX_SECONDS6 stops each stage by time (train.max_seconds: it then exports as at a last step); EXTRA6 adds
# --set options to both stages;
# BASE (default vldm_jax/assets/default_model) is the pipeline the stages start from.
#   SCALE=small RUNS=runs/shapes6 scripts/train_default_model.sh video6 interpolation6 assemble6
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/shapes}
NICE=${NICE:-19}
PYTHON=${PYTHON:-python}
mkdir -p "$RUNS"
BASE=${BASE:-vldm_jax/assets/default_model}
case "${SCALE:-small}" in
    small) STEPS6=${STEPS6:-4} EXAMPLES6=${EXAMPLES6:-64} BATCH6=${BATCH6:-1} EVERY6=2 ;;
    full)  STEPS6=${STEPS6:-3000} EXAMPLES6=${EXAMPLES6:-20000} BATCH6=${BATCH6:-32} EVERY6=500 ;;
    *) echo "SCALE must be small or full (got $SCALE)" >&2; exit 2 ;;
esac
model6=(--set data.in_memory=true --set data.path="moving_shapes:$EXAMPLES6:varied"
        --set data.batch_size_per_device="$BATCH6" --set train.steps="$STEPS6" --set train.checkpoint_every="$EVERY6"
        --set train.log_every=1 --set train.sample_every=0 --set optim.warmup_steps=$(( STEPS6 / 10 ))
        --set optim.learning_rate=5e-4 --set optim.ema_decay=0.999)
[ -z "${MAX_SECONDS6:-}" ] || model6+=(--set train.max_seconds="$MAX_SECONDS6")
read -r -a extra6 <<< "${EXTRA6:-}"
model6+=("${extra6[@]}")

base_as_unet() {  # base_as_unet PART DIR: a pipeline folder whose unet/ is BASE/PART (links, no copies)
    local part=$1 dir=$2 base
    base=$(cd "$BASE" && pwd)
    mkdir -p "$dir"
    for entry in model_index.json vae text_encoder tokenizer scheduler; do
        ln -sfn "$base/$entry" "$dir/$entry"
    done
    ln -sfn "$base/$part" "$dir/unet"
}

train_stage() {  # train_stage NAME CONFIG [vldm train options...]
    local name=$1 config=$2
    shift 2
    local done_path="$RUNS/$name/${DONE:-export}"
    if [ -e "$done_path" ]; then
        echo "[$name] done: $done_path exists (delete it to retrain)"
        return 0
    fi
    echo "[$name] training with $config in $RUNS/$name (log: $RUNS/$name.log)"
    # Appends, so the log of a resumed run keeps the earlier part.
    local status=0
    nice -n "$NICE" "$PYTHON" -m vldm_jax.cli train "$config" --workdir "$RUNS/$name" "$@" >> "$RUNS/$name.log" 2>&1 \
        || status=$?
    if [ ! -e "$done_path" ]; then
        echo "[$name] stopped before the end of training (exit status $status; see $RUNS/$name.log); run this" \
             "script again to resume from the last checkpoint" >&2
        exit 1
    fi
    tail -n 1 "$RUNS/$name/metrics.jsonl" | cut -c1-200
}

run_stage() {
    case "$1" in
        vae)
            train_stage vae configs/shapes/vae.yaml ;;
        image)
            [ -e "$RUNS/vae/export/vae" ] || { echo "[image] needs the vae stage first" >&2; exit 1; }
            train_stage image configs/shapes/image.yaml --set "model.pretrained=$RUNS/vae/export/vae" ;;
        decoder)
            # Needs only the vae stage (the encoder stays frozen), so it may also run beside image.
            [ -e "$RUNS/vae/export/vae" ] || { echo "[decoder] needs the vae stage first" >&2; exit 1; }
            train_stage vae_decoder configs/shapes/vae_decoder.yaml --set "model.pretrained=$RUNS/vae/export/vae" ;;
        video)
            # Key-frame + prediction model: temporal layers (text cross-attention) and the paper's context
            # encoder on the frozen image LDM, 5-frame clips with 0 (text-to-video), 1 or 2 given frames.
            [ -e "$RUNS/image/export/pipeline" ] || { echo "[video] needs the image stage first" >&2; exit 1; }
            DONE=temporal.safetensors train_stage video configs/shapes/video.yaml \
                --set "model.pretrained=$RUNS/image/export/pipeline" ;;
        interpolation)
            # x4 interpolation model: 9-frame clips, keyframes 0/4/8 given (SVD-style concat conditioning).
            # Independent of the video stage: both may run at once.
            [ -e "$RUNS/image/export/pipeline" ] || { echo "[interpolation] needs the image stage first" >&2; exit 1; }
            DONE=temporal.safetensors train_stage interpolation configs/shapes/interpolation.yaml \
                --set "model.pretrained=$RUNS/image/export/pipeline" ;;
        assemble)
            "$PYTHON" scripts/assemble_default_model.py --runs "$RUNS" ;;
        video6)
            # 5-frame clips of the varied renderer, 0/1/2 context frames as for model 5 (animate follows any frame).
            base_as_unet unet "$RUNS/base_unet"
            DONE=temporal.safetensors train_stage video6 configs/shapes/video.yaml \
                --set "model.pretrained=$RUNS/base_unet" "${model6[@]}" ;;
        interpolation6)
            base_as_unet interpolator "$RUNS/base_interpolator"
            DONE=temporal.safetensors train_stage interpolation6 configs/shapes/interpolation.yaml \
                --set "model.pretrained=$RUNS/base_interpolator" "${model6[@]}" ;;
        assemble6)
            "$PYTHON" scripts/assemble_default_model.py --base "$BASE" --video "$RUNS/video6" \
                --interpolation "$RUNS/interpolation6" --out "$RUNS/model6" ;;
        *)
            echo "unknown stage $1 (stages: vae image decoder video interpolation assemble" \
                 "video6 interpolation6 assemble6)" >&2
            exit 2 ;;
    esac
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then
    STAGES=(vae image decoder video interpolation assemble)
fi
for stage in "${STAGES[@]}"; do
    run_stage "$stage"
done
