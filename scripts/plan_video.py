"""The seed's video, planned: every stage of the Video LDM cascade at the paper's size, compiled ahead of time for a
TPU slice on this (CPU) machine, with XLA's memory and cost analyses per chip.

    python scripts/plan_video.py --topology v5p:2x2x2 --stage keyframes --out plan.jsonl
    python scripts/plan_video.py --topology v5p:2x2x2 --stage all --out plan.jsonl      # one after another
    python scripts/plan_video.py --table plan.jsonl                                      # the markdown table

113 frames at 1280x2048 (the paper's text-to-video setting) are made as:

    keyframes     8 frames, latents 40x64: SD 1.5 video U-Net with the paper's temporal layers, text CFG (batch 2)
    interp1       8 -> 29 frames: the interpolation U-Net (context frames through the temporal context encoder),
                  one window of all 8 keyframes, text CFG (batch 2)
    interp2       29 -> 113 frames: windows of 8 keyframes (29 frames, the model's training window), 4 windows
                  batched (stages.interpolation_windows: starts 0, 7, 14, 21), text CFG (batch 8)
    decode        113 frames at 320x512: the temporal VAE decoder (SD 1.5's VAE + 3D blocks), chunks of 8 frames
    upsample      x4 video upsampler (SD x4 upscaler U-Net + temporal layers) on latents 320x512 (the decoded frames'
                  size), 113 frames, tiled as the pipeline tiles (tiles of 128 with overlap 32: 3x5 = 15 tiles, 4 per
                  U-Net call, 4 calls per step), text CFG (batch 8 = 4 tiles x 2)
    updecode      the upscaler's VAE decoder, 320x512 latents -> 1280x2048 frames, 8 frames per call

One U-Net call (with its CFG batch) is compiled per U-Net stage; the per-stage time multiplies XLA's estimate by the
calls the stage makes (steps x windows x tile calls). XLA's cost analysis counts a loop body once, which is why
loops (the sampler's scan, the tile scan, the decode chunks) are not compiled whole. Weights are bf16 (inference),
replicated (fsdp=1); activations bf16. The memory of a whole step adds, to one call's, the full-plane blend buffers
of the tiled upsampler (113x320x512x4 f32 x2 = 0.6 GB over the slice) and the decode's output buffer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from vldm_jax.parallel import aot  # noqa: E402
from vldm_jax.parallel.activations import batch_sharding, video_sharding  # noqa: E402
from vldm_jax.parallel.mesh import mesh_from_sizes, parse_mesh  # noqa: E402

DTYPE = jnp.bfloat16

# Public diffusers config.json values: runwayml/stable-diffusion-v1-5 unet/ and vae/, and
# stabilityai/stable-diffusion-x4-upscaler unet/ and vae/.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, scaling_factor=0.18215)
X4_UNET = dict(sample_size=128, in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024),
               layers_per_block=2, cross_attention_dim=1024, attention_head_dim=8, num_class_embeds=1000,
               only_cross_attention=(True, True, True, False), use_linear_projection=True,
               down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
               up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))
X4_VAE = dict(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=4, sample_size=256,
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
              scaling_factor=0.08333)

TEXT_LEN = 77
KEYFRAMES, LATENT_H, LATENT_W = 8, 40, 64
STEPS = 25            # the text-to-video pipeline's default (keyframes and each interpolation pass)
UPSAMPLER_STEPS = 20  # VideoUpscalePipeline's default
GUIDANCE = 7.5
TILE, OVERLAP, TILE_BATCH = 128, 32, 4
DECODE_CHUNK = 8
STAGES = ("keyframes", "interp1", "interp2", "decode", "upsample", "updecode")

# Mesh per stage and slice size (chips): frames over context where they divide; otherwise the CFG / window / tile
# batch over data, rows over context (29 and 113 frames divide by no power of two).
MESHES = {
    8: {"keyframes": "context=8", "interp1": "data=2,context=4", "interp2": "data=8", "decode": "context=8",
        "upsample": "data=8", "updecode": "data=8"},
    16: {"keyframes": "data=2,context=8", "interp1": "data=2,context=8", "interp2": "data=8,context=2",
         "decode": "data=2,context=8", "upsample": "data=8,context=2", "updecode": "data=16"},
    4: {"keyframes": "context=4", "interp1": "data=2,context=2", "interp2": "data=4", "decode": "context=4",
        "upsample": "data=4", "updecode": "data=4"},
}


def _video_unet(image: dict, **temporal):
    from vldm_jax.models.unet import TemporalConfig, UNet2DConditionConfig, VideoUNet, VideoUNetConfig

    config = VideoUNetConfig.from_image_config(UNet2DConditionConfig(**image), TemporalConfig.paper(**temporal))
    return lambda rngs: VideoUNet(config, rngs=rngs, dtype=DTYPE)


def _abstract(factory, mesh):
    graph, state = aot.abstract_module(factory)
    return graph, aot.abstract_sharded(state, mesh, dtype=DTYPE)


def _count(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state))


def _unet_stage(mesh, *, batch: int, frames: int, context_frames: bool):
    """One denoising call of a key-frame / interpolation U-Net with text CFG: ``batch`` videos (windows)."""
    from vldm_jax.pipelines.stages import guided_output

    factory = _video_unet(SD15_UNET, num_frames=frames,
                          **({"context_conditioning": "temporal"} if context_frames else {}))
    graph, state = _abstract(factory, mesh)
    shape = (batch, frames, LATENT_H, LATENT_W, 4)
    x = aot.abstract_array(shape, DTYPE, video_sharding(mesh, shape))
    text = aot.abstract_array((batch, TEXT_LEN, 768), DTYPE, batch_sharding(mesh, (batch, TEXT_LEN, 768)))
    lat = aot.abstract_array(shape, DTYPE, video_sharding(mesh, shape)) if context_frames else None
    mask = aot.abstract_array((batch, frames), DTYPE, batch_sharding(mesh, (batch, frames))) if context_frames else None

    @jax.jit
    def step(state, x, t, text, null_text, lat, mask):
        unet = nnx.merge(graph, state)

        def call(xx, tt, txt, la, ma):
            kwargs = {} if la is None else {"context_latents": la, "context_mask": ma}
            return unet(xx, jnp.broadcast_to(tt, (xx.shape[0],)), txt, **kwargs)

        return guided_output(call, x, t, text, null_text, lat, mask, GUIDANCE, 1.0, guide_text=True,
                             guide_context=False)

    t = aot.replicated(mesh, (), jnp.float32)
    return step, (state, x, t, text, text, lat, mask), _count(state)


def _decode_stage(mesh):
    from vldm_jax.models.autoencoder import AutoencoderKLTemporalDecoder, AutoencoderKLTemporalDecoderConfig

    config = AutoencoderKLTemporalDecoderConfig(**SD15_VAE, use_post_quant_conv=True, mid_block_num_layers=2)
    graph, state = _abstract(lambda rngs: AutoencoderKLTemporalDecoder(config, rngs=rngs, dtype=DTYPE), mesh)
    shape = (1, DECODE_CHUNK, LATENT_H, LATENT_W, 4)
    z = aot.abstract_array(shape, DTYPE, video_sharding(mesh, shape))

    @jax.jit
    def decode_chunk(state, z):
        vae = nnx.merge(graph, state)
        return vae.decode_video(z / config.scaling_factor)

    return decode_chunk, (state, z), _count(state)


def _upsample_stage(mesh):
    from vldm_jax.pipelines.upscale import make_denoiser

    frames = 4 * (4 * (KEYFRAMES - 1)) + 1
    factory = _video_unet(X4_UNET, num_frames=frames)
    graph, state = _abstract(factory, mesh)
    k = TILE_BATCH
    shape = (k, frames, TILE, TILE, 4)
    x = aot.abstract_array(shape, DTYPE, video_sharding(mesh, shape))
    image = aot.abstract_array((k, frames, TILE, TILE, 3), DTYPE, video_sharding(mesh, (k, frames, TILE, TILE, 3)))
    text = aot.abstract_array((k, TEXT_LEN, 1024), DTYPE, batch_sharding(mesh, (k, TEXT_LEN, 1024)))
    labels = aot.abstract_array((k,), jnp.int32, batch_sharding(mesh, (k,)))

    @jax.jit
    def tile_call(state, x, t, text, null_text, image, labels):
        unet = nnx.merge(graph, state)
        denoise = make_denoiser(unet, text, null_text, image, labels, GUIDANCE, guided=True, tiling=None)
        return denoise(x, jnp.broadcast_to(t, (x.shape[0],)))

    t = aot.replicated(mesh, (), jnp.float32)
    return tile_call, (state, x, t, text, text, image, labels), _count(state)


def _updecode_stage(mesh, chips: int):
    from vldm_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig

    config = AutoencoderKLConfig(**X4_VAE)
    graph, state = _abstract(lambda rngs: AutoencoderKL(config, rngs=rngs, dtype=DTYPE), mesh)
    n = chips  # one frame per chip per call
    shape = (n, LATENT_H * 8, LATENT_W * 8, 4)  # the upscaler latents: the low-res frames. size, 320x512
    z = aot.abstract_array(shape, DTYPE, NamedSharding(mesh, P(("data", "fsdp", "context"))))

    @jax.jit
    def decode_frames(state, z):
        return nnx.merge(graph, state).decode(z / config.scaling_factor)

    return decode_frames, (state, z), _count(state)


def calls_per_stage(stage: str, chips: int) -> int:
    from vldm_jax.pipelines.upscale import tile_layout

    if stage in ("keyframes", "interp1", "interp2"):
        return STEPS
    if stage == "decode":
        frames = 4 * (4 * (KEYFRAMES - 1)) + 1
        return -(-frames // DECODE_CHUNK)
    if stage == "upsample":
        _, starts, _ = tile_layout(LATENT_H * 8, LATENT_W * 8, TILE, OVERLAP)
        return UPSAMPLER_STEPS * -(-len(starts) // TILE_BATCH)
    if stage == "updecode":
        return -(-(4 * (4 * (KEYFRAMES - 1)) + 1) // chips)
    raise KeyError(stage)


def build(stage: str, mesh, chips: int):
    from vldm_jax.pipelines.stages import interpolation_windows

    if stage == "keyframes":
        return _unet_stage(mesh, batch=1, frames=KEYFRAMES, context_frames=False)
    if stage == "interp1":
        return _unet_stage(mesh, batch=1, frames=4 * (KEYFRAMES - 1) + 1, context_frames=True)
    if stage == "interp2":
        windows = len(interpolation_windows(4 * (KEYFRAMES - 1) + 1, KEYFRAMES))
        return _unet_stage(mesh, batch=windows, frames=4 * (KEYFRAMES - 1) + 1, context_frames=True)
    if stage == "decode":
        return _decode_stage(mesh)
    if stage == "upsample":
        return _upsample_stage(mesh)
    if stage == "updecode":
        return _updecode_stage(mesh, chips)
    raise KeyError(stage)


def run_stage(stage: str, topology: str | None, mesh_text: str | None, attention: str | None) -> dict:
    from vldm_jax.nn import attention as attn

    if attention:
        attn.ATTENTION_IMPLEMENTATION = attention
    devices = aot.target_devices(topology)
    chips = len(devices)
    mesh_text = mesh_text or MESHES.get(chips, {}).get(stage, f"data={chips}")
    mesh = mesh_from_sizes(parse_mesh(mesh_text), devices)
    t0 = time.perf_counter()
    fn, args, params = build(stage, mesh, chips)
    build_s = time.perf_counter() - t0
    _, report = aot.compile_report(fn, *args, mesh=mesh, name=stage)
    row = report.as_dict()
    row.update(topology=topology or "host", mesh_text=mesh_text, params=params, build_seconds=build_s,
               calls=calls_per_stage(stage, chips), attention=attention or "auto")
    return row


def table(rows: list[dict]) -> str:
    out = []
    by_topo: dict[str, list[dict]] = {}
    for r in rows:
        by_topo.setdefault(r["topology"], []).append(r)
    for topo, rs in by_topo.items():
        out.append(f"**{topo}** ({rs[0]['device_kind']} x{rs[0]['num_devices']})\n")
        out.append("| stage | mesh | params | peak / chip | fits | TFLOP / chip / call | est. / call | calls | "
                   "est. stage | compile |")
        out.append("|" + "---|" * 10)
        total = 0.0
        for r in rs:
            est = r["est_seconds"]
            stage_s = None if est is None else est * r["calls"]
            total += stage_s or 0.0
            fits = "n/a" if r["fits"] is None else ("yes" if r["fits"] else "**no**")
            hbm = "" if r["hbm_bytes"] is None else f" / {r['hbm_bytes'] / aot.GiB:.0f}"
            out.append(
                f"| {r['name']} | {r['mesh_text']} | {r['params'] / 1e6:.0f} M | "
                f"{r['peak_bytes'] / aot.GiB:.2f}{hbm} GiB | {fits} | "
                f"{'n/a' if r['flops'] is None else format(r['flops'] / 1e12, '.2f')} | "
                f"{'n/a' if est is None else format(est, '.3g') + ' s'} ({r['est_source']}) | {r['calls']} | "
                f"{'n/a' if stage_s is None else format(stage_s, '.3g') + ' s'} | {r['compile_seconds']:.0f} s |")
        out.append(f"\nestimated time of the stages above: {total:.2f} s\n")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5p:2x2x2", help="TPU topology (libtpu), or 'host' for this host")
    p.add_argument("--stage", default="keyframes", help=f"one of {', '.join(STAGES)}, or 'all'")
    p.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=2,context=4 (default: per stage)")
    p.add_argument("--attention", default=None, help="attention implementation (default: auto for the target)")
    p.add_argument("--out", default=None, help="append one JSON line per stage to this file")
    p.add_argument("--table", default=None, help="print the markdown table of a JSON-lines file and exit")
    a = p.parse_args(argv)
    if a.table:
        rows = [json.loads(l) for l in Path(a.table).read_text().splitlines() if l.strip()]
        print(table(rows))
        return 0
    topology = None if a.topology == "host" else a.topology
    for stage in (STAGES if a.stage == "all" else a.stage.split(",")):
        row = run_stage(stage, topology, a.mesh, a.attention)
        line = json.dumps(row)
        print(aot.CompileReport(**{k: row[k] for k in aot.CompileReport.__dataclass_fields__}).summary(), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
