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
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/shapes}
NICE=${NICE:-19}
PYTHON=${PYTHON:-python}
mkdir -p "$RUNS"

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
        *)
            echo "unknown stage $1 (stages: vae image decoder video interpolation assemble)" >&2
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
