"""AnimateDiff: motion modules in our video U-Net against diffusers (``UNetMotionModel``, ``AnimateDiffPipeline``)
on tiny random weights saved with ``save_pretrained``: an SD 1.x folder and two MotionAdapter folders (``v1``: no
mid-block module, window 32; ``v2``: a mid-block module, window 24, 4 heads, two transformer layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.tiny_animatediff import (
    ADAPTERS,
    adapter_to_original,
    diffusers_animatediff,
    make_adapter_folder,
    tiny_adapter,
)
from tests.helpers.tiny_sd import make_tiny_sd_pipeline_folder

FRAMES, STEPS, SIZE = 8, 2, 16  # tiny VAE: factor 2, so 8x8 latents
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("animatediff")
    sd = make_tiny_sd_pipeline_folder(tmp)
    adapters = {name: make_adapter_folder(tmp, name) for name in ADAPTERS}
    noise = np.random.default_rng(0).standard_normal((1, FRAMES, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    reference = {}
    for name, folder in adapters.items():
        ref = diffusers_animatediff(sd, folder)
        reference[name] = np.asarray(ref(PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE,
                                         num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
                                         latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3))).frames)
    return dict(tmp=tmp, sd=sd, adapters=adapters, noise=noise, reference=reference, pipes={})


def ours(world, name, adapter=None, **kwargs):
    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_pretrained(world["sd"], motion_adapter=adapter or world["adapters"][name],
                                               **kwargs)
    frames = pipe(PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=7.5, latents=world["noise"])
    return pipe, frames


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_frames_match_diffusers(world, name):
    pipe, frames = ours(world, name)
    world["pipes"][name] = pipe
    assert frames.shape == (1, FRAMES, SIZE, SIZE, 3) and frames.dtype == np.float32
    ref = world["reference"][name]
    assert np.abs(frames - ref).max() < 2e-3
    # the motion modules matter: the frames differ from one another and from the other adapter's
    assert np.abs(frames[:, 1:] - frames[:, :-1]).max() > 1e-2
    other = world["reference"][{"v1": "v2", "v2": "v1"}[name]]
    assert np.abs(frames - other).max() > 1e-2


def test_unet_step_matches_diffusers_motion_unet(world):
    """One U-Net call (module parity, 1e-4): diffusers ``UNetMotionModel.from_unet2d`` vs ours."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from vldm_jax.models.roles import is_temporal_path

    pipe = world["pipes"].get("v2") or ours(world, "v2")[0]
    ref = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet"),
                                      MotionAdapter.from_pretrained(world["adapters"]["v2"])).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 128)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), 500, torch.from_numpy(np.repeat(ctx, 5, axis=0))).sample.numpy()  # per frame
    import jax
    from flax import nnx

    graph, state = nnx.split(pipe.unet)
    call = jax.jit(lambda st, x, c: nnx.merge(graph, st)(x, 500, c))
    got = np.asarray(call(state, x.transpose(0, 2, 3, 4, 1), ctx)).transpose(0, 4, 1, 2, 3)
    assert np.abs(got - want).max() < 1e-4
    # every motion-module parameter is temporal (freezing, temporal weight files, spatial swaps)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(pipe.unet))]
    motion = [p for p in paths if "motion_modules" in p]
    assert motion and all(is_temporal_path(p) for p in motion)
    assert not any(is_temporal_path(p) for p in paths if "motion_modules" not in p)
    assert any(p.startswith("mid_block.motion_modules.0.transformer_blocks.0") for p in motion)


def test_original_single_file_same_frames(world):
    """The v1 adapter written in the original ``mm_sd_v15`` layout (safetensors) gives the same frames."""
    from safetensors.torch import save_file

    path = world["tmp"] / "mm_sd_v15_tiny.safetensors"
    save_file(adapter_to_original(tiny_adapter("v1").state_dict(), 32), str(path))
    _, frames = ours(world, "v1", adapter=path)
    assert np.abs(frames - world["reference"]["v1"]).max() < 2e-3


def test_original_layout_config_and_pickle(world):
    """The config read off an original file (mid block, window, layers), and .ckpt only with allow_pickle."""
    from vldm_jax.checkpoints.animatediff import read_motion_adapter
    from vldm_jax.errors import CheckpointError

    state = tiny_adapter("v2").state_dict()
    path = world["tmp"] / "mm_sd_v15_v2_tiny.ckpt"
    torch.save(adapter_to_original(state, 24), str(path))
    with pytest.raises(CheckpointError, match="pickle"):
        read_motion_adapter(path)
    adapter = read_motion_adapter(path, allow_pickle=True)
    c = adapter.config
    assert (c["use_motion_mid_block"], c["motion_max_seq_length"], c["motion_transformer_layers_per_block"],
            tuple(c["block_out_channels"])) == (True, 24, 2, (32, 32, 64))
    assert sorted(adapter.state_dict) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(adapter.state_dict[k], v.numpy())


def test_diffusers_animatediff_pipeline_folder(world):
    """A saved diffusers AnimateDiff pipeline folder (its unet a ``UNetMotionModel``) loads with the same weights."""
    from flax import nnx

    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline

    folder = world["tmp"] / "diffusers_animatediff"
    diffusers_animatediff(world["sd"], world["adapters"]["v2"]).save_pretrained(folder, safe_serialization=True)
    loaded = AnimateDiffPipeline.from_pretrained(folder)
    pipe = world["pipes"].get("v2") or ours(world, "v2")[0]
    a = dict(nnx.to_flat_state(nnx.state(loaded.unet)))
    b = dict(nnx.to_flat_state(nnx.state(pipe.unet)))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))


def test_bad_inputs(world):
    from vldm_jax.checkpoints.animatediff import check_compatible, read_motion_adapter
    from vldm_jax.errors import CheckpointError, UserError
    from vldm_jax.models.unet import UNet2DConditionConfig
    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline

    sd15 = {"block_out_channels": (320, 640, 1280, 1280), "motion_layers_per_block": 2}
    check_compatible(UNet2DConditionConfig(cross_attention_dim=768), sd15)
    with pytest.raises(CheckpointError, match="SD 2.x"):
        check_compatible(UNet2DConditionConfig(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20)), sd15)
    sdxl = UNet2DConditionConfig(cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                                 down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
    with pytest.raises(CheckpointError, match="SDXL"):
        check_compatible(sdxl, sd15)
    with pytest.raises(CheckpointError, match="motion modules per block"):
        check_compatible(UNet2DConditionConfig(cross_attention_dim=768, layers_per_block=1), sd15)
    # a U-Net whose channels differ from the adapter's: one line naming the mismatch
    bad = world["tmp"] / "adapter_bad"
    from diffusers import MotionAdapter

    MotionAdapter(**{**ADAPTERS["v1"], "block_out_channels": (32, 64, 64)}).save_pretrained(bad)
    with pytest.raises(CheckpointError, match="block channels") as e:
        AnimateDiffPipeline.from_pretrained(world["sd"], motion_adapter=bad)
    assert "\n" not in str(e.value)
    pipe = world["pipes"].get("v1") or ours(world, "v1")[0]
    for frames in (0, -3):
        with pytest.raises(UserError, match="num_frames"):
            pipe(PROMPT, num_frames=frames, height=SIZE, width=SIZE)
    with pytest.raises(UserError, match="window"):
        pipe(PROMPT, num_frames=40, height=SIZE, width=SIZE)
    with pytest.raises(CheckpointError, match="not found"):
        read_motion_adapter(world["tmp"] / "missing.safetensors")


def _cli(capsys, *args):
    from vldm_jax.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_cli_generate_with_motion_adapter(world, capsys):
    import imageio.v3 as iio

    out = world["tmp"] / "clip.gif"
    rc, err = _cli(capsys, "generate", PROMPT, "--checkpoint", world["sd"], "--motion-adapter",
                   world["adapters"]["v1"], "--frames", FRAMES, "--steps", STEPS, "--height", SIZE, "--width", SIZE,
                   "--out", out)
    assert rc == 0, err
    assert iio.imread(out).shape == (FRAMES, SIZE, SIZE, 3)
    # bad input: one line, exit 2, no file
    ckpt = world["tmp"] / "mm_cli.ckpt"
    torch.save(adapter_to_original(tiny_adapter("v1").state_dict(), 32), str(ckpt))
    for bad, args in (("frames", ["--frames", 0]), ("pickle", ["--motion-adapter", ckpt]),
                      ("missing", ["--checkpoint", world["tmp"] / "nothing_here"])):
        target = world["tmp"] / f"bad_{bad.replace(' ', '_')}.gif"
        base = {"--checkpoint": world["sd"], "--motion-adapter": world["adapters"]["v1"], "--frames": FRAMES}
        for k, v in zip(args[::2], args[1::2]):
            base[k] = v
        rc, err = _cli(capsys, "generate", PROMPT, *[x for kv in base.items() for x in kv], "--out", target)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("vldm: error:"), (bad, err)
        assert not target.exists()


def test_lcm_frames_match_diffusers(world):
    """The LCM sampler in the pipeline (3 steps, guidance 1.5) with diffusers' per-step noise replayed."""
    from diffusers import LCMScheduler

    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline

    steps, noise = 3, world["noise"]
    ref = diffusers_animatediff(world["sd"], world["adapters"]["v1"])
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    want = ref(PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=1.5,
               latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3)), output_type="np",
               generator=torch.Generator().manual_seed(5)).frames
    gen = torch.Generator().manual_seed(5)  # diffusers draws each step's noise from the generator, in order
    step_noise = [torch.randn((1, 4) + noise.shape[1:4], generator=gen).numpy().transpose(0, 2, 3, 4, 1)
                  for _ in range(steps - 1)] + [np.zeros_like(noise)]
    pipe = world["pipes"].get("v1") or AnimateDiffPipeline.from_pretrained(world["sd"],
                                                                           motion_adapter=world["adapters"]["v1"])
    got = pipe(PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=1.5,
               latents=noise, scheduler="lcm", step_noise=np.stack(step_noise))
    assert np.abs(got - np.asarray(want)).max() < 2e-3


def test_free_noise_windows_and_noise():
    from diffusers.models.attention import FreeNoiseTransformerBlock

    from vldm_jax.nn.temporal import free_noise_frame_weights, free_noise_windows
    from vldm_jax.pipelines.free_noise import rescheduled_frames

    for n in (7, 8):
        for scheme in ("flat", "pyramid", "delayed_reverse_sawtooth"):
            assert free_noise_frame_weights(n, scheme) == FreeNoiseTransformerBlock._get_frame_weights(None, n, scheme)
    windows = free_noise_windows(14, 8, 4, "pyramid")
    assert [(s, e) for s, e, _, _ in windows] == [(0, 8), (4, 12), (6, 14)]
    assert windows[-1][2][:6] == (0.0,) * 6 and windows[-1][3][6:] == (2.0, 2.0)
    src = rescheduled_frames(20, 8, 4, "shuffle_context", seed=0)
    assert list(src[:8]) == list(range(8)) and sorted(src[8:12]) == [0, 1, 2, 3]
    assert list(rescheduled_frames(20, 8, 4, "repeat_context", 0)) == [i % 8 for i in range(20)]


@pytest.mark.slow
def test_free_noise_frames_match_diffusers(world):
    """FreeNoise (8-frame windows every 4 frames, the last window incomplete) on 14 frames, v2 adapter."""
    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline

    frames = 14
    noise = np.random.default_rng(3).standard_normal((1, frames, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    ref = diffusers_animatediff(world["sd"], world["adapters"]["v2"])
    ref.enable_free_noise(context_length=8, context_stride=4)
    want = ref(PROMPT, num_frames=frames, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
               latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3)), output_type="np").frames
    pipe = AnimateDiffPipeline.from_pretrained(world["sd"], motion_adapter=world["adapters"]["v2"])
    pipe.enable_free_noise(context_length=8, context_stride=4)
    got = pipe(PROMPT, num_frames=frames, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
               latents=noise)
    assert np.abs(got - np.asarray(want)).max() < 2e-3


def test_loras_match_diffusers(world, capsys):
    """An image LoRA (kohya with alpha, U-Net; PEFT, U-Net and text encoder) and a motion LoRA (PEFT), fused at
    load, against diffusers' load_lora_weights + set_adapters; the original motion-LoRA layout and kohya's LDM names
    fuse to the same weights; a LoRA for another model is one line, exit 2."""
    from flax import nnx
    from safetensors.torch import save_file

    from tests.helpers.tiny_animatediff import image_lora, motion_lora
    from vldm_jax.checkpoints.lora import fuse_loras
    from vldm_jax.pipelines.animatediff import AnimateDiffPipeline

    tmp, noise = world["tmp"], world["noise"]
    ref = diffusers_animatediff(world["sd"], world["adapters"]["v1"])
    files = {}
    for name, lora in (("kohya", image_lora(ref.unet, ref.text_encoder, layout="kohya", seed=1)),
                       ("kohya_ldm", image_lora(ref.unet, ref.text_encoder, layout="kohya_ldm", seed=1)),
                       ("peft", image_lora(ref.unet, ref.text_encoder, layout="peft", seed=2)),
                       ("motion", motion_lora(tiny_adapter("v1"))),
                       ("motion_original", motion_lora(tiny_adapter("v1"), original=True))):
        files[name] = tmp / f"lora_{name}.safetensors"
        save_file(lora, str(files[name]))
        if name == "kohya":  # diffusers does not read kohya text-encoder keys of a transformers-5 CLIP
            files["kohya_unet"] = tmp / "lora_kohya_unet.safetensors"
            save_file({k: v for k, v in lora.items() if not k.startswith("lora_te_")}, str(files["kohya_unet"]))
    scales = {"kohya_unet": 0.8, "peft": 0.6, "motion": 0.7}
    for name in scales:
        ref.load_lora_weights(str(files[name]), adapter_name=name)
    ref.set_adapters(list(scales), adapter_weights=list(scales.values()))
    want = ref(PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
               latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3)), output_type="np").frames
    pipe = AnimateDiffPipeline.from_pretrained(world["sd"], motion_adapter=world["adapters"]["v1"],
                                               lora=[(files[n], s) for n, s in scales.items()])
    got = pipe(PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
               latents=noise)
    assert np.abs(got - np.asarray(want)).max() < 2e-3
    assert np.abs(got - world["reference"]["v1"]).max() > 1e-2  # the LoRAs change the frames

    base = world["pipes"].get("v1") or AnimateDiffPipeline.from_pretrained(world["sd"],
                                                                           motion_adapter=world["adapters"]["v1"])

    def fused(*pairs):
        unet, text = fuse_loras(base.unet, base.text_encoder, pairs)
        return {**{("u",) + tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(unet))},
                **{("t",) + tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(text))}}

    for a, b in (("kohya", "kohya_ldm"), ("motion", "motion_original")):  # text-encoder keys included
        x, y = fused((files[a], 0.5)), fused((files[b], 0.5))
        assert max(float(np.abs(np.asarray(x[k]) - np.asarray(y[k])).max()) for k in x) < 1e-6, (a, b)

    # a LoRA for another model: a layer this U-Net lacks, or the wrong shape
    other = tmp / "lora_other.safetensors"
    save_file({"lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(other))
    wrong = tmp / "lora_wrong.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 320),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(320, 4)}, str(wrong))
    capsys.readouterr()  # what diffusers printed while loading
    for bad in (other, wrong):
        out = tmp / f"{bad.stem}.gif"
        rc, err = _cli(capsys, "generate", PROMPT, "--checkpoint", world["sd"], "--motion-adapter",
                       world["adapters"]["v1"], "--lora", f"{bad}:0.5", "--frames", FRAMES, "--out", out)
        assert rc == 2 and err.count("\n") == 1 and "another model" in err, err
        assert not out.exists()
