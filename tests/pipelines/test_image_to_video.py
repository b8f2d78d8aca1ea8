"""ImageToVideoPipeline against diffusers' StableVideoDiffusionPipeline on a tiny random SVD saved with
save_pretrained (config "a" of tests/helpers/tiny_svd.py); SVD preprocessing against diffusers' functions; the
original single-file layout. Every pipeline run here has one shape, so the file compiles the sampler once."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd_module  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from tests.helpers import tiny_svd  # noqa: E402
from vldm_jax.checkpoints.svd_single_file import SVD_SCHEDULER_CONFIG, split_svd_checkpoint  # noqa: E402
from vldm_jax.errors import CheckpointError, UserError  # noqa: E402
from vldm_jax.pipelines import image_to_video as i2v  # noqa: E402
from vldm_jax.pipelines.image_to_video import ImageToVideoPipeline, clip_pixels, resize_with_antialiasing, vae_pixels  # noqa: E402

# batch, frames, height, width, steps, (min, max) guidance, decode chunk: guided, chunked, non-square.
RUN = dict(b=1, f=3, height=16, width=24, steps=3, guidance=(1.0, 3.0), chunk=2)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return tiny_svd.Case("a", tmp_path_factory.mktemp("svd_a"))


# ---------------------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("shape", [(576, 1024), (40, 56), (300, 200), (224, 224), (97, 513)])
def test_resize_with_antialiasing_matches_diffusers(shape):
    x = np.random.default_rng(1).uniform(-1, 1, (*shape, 3)).astype(np.float32)
    ref = svd_module._resize_with_antialiasing(torch.from_numpy(x.transpose(2, 0, 1)[None]), (224, 224))
    ours = resize_with_antialiasing(x, (224, 224))
    err = np.abs(ours - ref[0].numpy().transpose(1, 2, 0)).max()
    print(f"resize {shape}: max abs err {err:.2e}")
    assert err < 1e-5


def test_clip_and_vae_preprocessing_match_diffusers(case):
    ref = case.ref
    image = tiny_svd.make_image(70, 90)
    pil = Image.fromarray(image)
    # diffusers' _encode_image up to the encoder call
    t = ref.video_processor.numpy_to_pt(ref.video_processor.pil_to_numpy(pil)) * 2.0 - 1.0
    t = (svd_module._resize_with_antialiasing(t, (224, 224)) + 1.0) / 2.0
    pix = ref.feature_extractor(images=t, do_normalize=True, do_center_crop=False, do_resize=False,
                                do_rescale=False, return_tensors="pt").pixel_values
    err_clip = np.abs(clip_pixels([image], (224, 224)) - pix.numpy().transpose(0, 2, 3, 1)).max()
    vae_ref = ref.video_processor.preprocess(pil, height=48, width=64).numpy().transpose(0, 2, 3, 1)
    err_vae = np.abs(vae_pixels([pil], 48, 64) - vae_ref).max()
    print(f"clip pixels max abs err {err_clip:.2e}, vae pixels max abs err {err_vae:.2e}")
    assert err_clip < 1e-5 and err_vae < 1e-6


def test_image_embeddings_match_diffusers(case):
    image = tiny_svd.make_image(48, 64, seed=3)
    with torch.no_grad():
        ref = case.ref._encode_image(Image.fromarray(image), "cpu", 1, False).numpy()
    ours = np.asarray(case.pipe.encode_image([image]))
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"image embedding rel err {err:.2e}")
    assert ours.shape == ref.shape and err < 1e-4


# --------------------------------------------------------------------------------------------- whole pipeline

def test_pipeline_matches_diffusers(case):
    ours, ref = tiny_svd.compare_with_diffusers(case, **RUN)
    assert ours.shape == ref.shape == (1, 3, 16, 24, 3) and ours.dtype == np.float32
    err = float(np.abs(ours - ref).max())
    print(f"config a, guided, chunked: frames max abs err {err:.2e} (std {ref.std():.3f})")
    assert ref.std() > 0.02  # not two constant videos
    assert err < 2e-3


def test_noise_augmentation_matches_diffusers(case, monkeypatch):
    """noise_aug_strength > 0: the same image noise on both sides (diffusers' draw is patched in)."""
    image = tiny_svd.make_image(44, 60, seed=6)
    f, h, w = RUN["f"], RUN["height"], RUN["width"]
    latents = np.random.default_rng(8).standard_normal((1, f, h // 2, w // 2, 4)).astype(np.float32)
    noise = np.random.default_rng(9).standard_normal((1, h, w, 3)).astype(np.float32)
    ref = tiny_svd.run_reference(case, image, f=f, height=h, width=w, steps=RUN["steps"], latents=latents,
                                 noise_aug=0.3, image_noise=noise, chunk=RUN["chunk"], monkeypatch=monkeypatch)
    monkeypatch.setattr(i2v, "image_noise", lambda key, shape: jnp.asarray(noise).reshape(shape))
    ours = case.pipe(image, height=h, width=w, num_frames=f, num_inference_steps=RUN["steps"], fps=7,
                     motion_bucket_id=100, noise_aug_strength=0.3, decode_chunk_size=RUN["chunk"], latents=latents)
    err = float(np.abs(ours - ref).max())
    print(f"noise aug 0.3: frames max abs err {err:.2e}")
    assert err < 2e-3


def test_seeded_noise_is_reproducible(case):
    image = tiny_svd.make_image(20, 20)
    kw = dict(height=RUN["height"], width=RUN["width"], num_frames=RUN["f"], num_inference_steps=RUN["steps"],
              decode_chunk_size=RUN["chunk"])
    a = case.pipe(image, seed=1, **kw)
    np.testing.assert_array_equal(a, case.pipe(image, seed=1, **kw))
    assert np.abs(case.pipe(image, seed=2, **kw) - a).max() > 1e-3
    with pytest.raises(UserError, match="latents must have shape"):
        case.pipe(image, latents=np.zeros((1, 3, 4, 4, 4), np.float32), **kw)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=20), "multiples of 8"),
    (dict(width=0), "multiples of 8"),
    (dict(num_frames=0), "num_frames"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(decode_chunk_size=0), "decode_chunk_size"),
    (dict(noise_aug_strength=-1.0), "noise_aug_strength"),
    (dict(image=np.zeros((8, 8, 3), np.float32)), "uint8"),
    (dict(image="cat.png"), "PIL image"),
    (dict(image=[]), "empty"),
])
def test_bad_arguments(case, kwargs, match):
    kw = dict(image=tiny_svd.make_image(16, 16), height=16, width=16, num_frames=2, num_inference_steps=1)
    kw.update(kwargs)
    with pytest.raises(UserError, match=match):
        case.pipe(kw.pop("image"), **kw)


def test_folder_errors(tmp_path, case):
    with pytest.raises(CheckpointError, match="model_index.json"):
        ImageToVideoPipeline.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        ImageToVideoPipeline.from_pretrained(tmp_path / "svd_xt.safetensors")
    # A text-to-image folder is not an SVD pipeline.
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (tmp_path / "sd" / part).mkdir(parents=True)
    (tmp_path / "sd" / "model_index.json").write_text('{"unet": [], "vae": [], "text_encoder": [], "scheduler": []}')
    with pytest.raises(CheckpointError, match="image_encoder"):
        ImageToVideoPipeline.from_pretrained(tmp_path / "sd")


def test_variant_folder_and_hub_patterns(case, tmp_path):
    """A folder saved with variant="fp16" file names loads with variant="fp16"; the hub patterns of that
    variant select exactly the files the pipeline reads."""
    import fnmatch

    case.ref.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    pipe = ImageToVideoPipeline.from_pretrained(tmp_path, variant="fp16")
    assert type(pipe.unet).__name__ == "UNetSpatioTemporalConditionModel"
    files = [str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file()]
    wanted = [f for f in files if any(fnmatch.fnmatch(f, p) for p in i2v.hub_patterns("fp16"))]
    assert any(f.endswith("unet/diffusion_pytorch_model.fp16.safetensors") for f in wanted)
    assert any(f.endswith("image_encoder/model.fp16.safetensors") for f in wanted)
    assert not any(fnmatch.fnmatch("unet/diffusion_pytorch_model.safetensors", p) for p in i2v.hub_patterns("fp16"))


# ------------------------------------------------------------------------------------------------ single file

def test_single_file_components_equal_diffusers_weights(case):
    ref = case.ref
    parts = split_svd_checkpoint(tiny_svd.svd_single_file_state_dict(ref), num_frames=3)
    for module, got in ((ref.unet, parts.unet_state_dict), (ref.image_encoder, parts.image_encoder_state_dict)):
        want = {k: v.numpy() for k, v in module.state_dict().items()}
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
    ucfg = dict(ref.unet.config)
    for k, v in parts.unet_config.items():
        if not k.startswith("_"):
            assert (list(ucfg[k]) if isinstance(ucfg[k], (tuple, list)) else ucfg[k]) == v, k
    for k, v in parts.image_encoder_config.items():
        if k not in ("architectures", "model_type"):
            assert getattr(ref.image_encoder.config, k) == v, k
    assert parts.scheduler_config == SVD_SCHEDULER_CONFIG
    assert parts.vae_config["scaling_factor"] == ref.vae.config.scaling_factor


def test_single_file_pipeline_matches_diffusers(case, tmp_path):
    path = tmp_path / "svd_xt_tiny.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tiny_svd.svd_single_file_state_dict(case.ref).items()},
              str(path))
    pipe = ImageToVideoPipeline.from_pretrained(path, num_frames=3)
    assert pipe.unet.config.num_frames == 3
    assert ImageToVideoPipeline.from_pretrained(path).unet.config.num_frames == 25  # "xt" in the file name
    ours, ref = tiny_svd.compare_with_diffusers(case, pipe=pipe, **RUN)
    err = float(np.abs(ours - ref).max())
    print(f"single file: frames max abs err {err:.2e}")
    assert err < 2e-3


def test_single_file_errors(case):
    sd = tiny_svd.svd_single_file_state_dict(case.ref)
    with pytest.raises(CheckpointError, match="image encoder"):
        split_svd_checkpoint({k: v for k, v in sd.items() if ".open_clip." not in k})
    with pytest.raises(CheckpointError, match="time_stack"):
        split_svd_checkpoint({k: v for k, v in sd.items() if not (k.startswith("model.") and ".time_stack." in k)})
    with pytest.raises(CheckpointError, match="unrecognised checkpoint keys"):
        split_svd_checkpoint({**sd, "conditioner.embedders.0.open_clip.model.visual.bogus": np.zeros(1)})
    with pytest.raises(CheckpointError, match="Stable Video Diffusion"):
        split_svd_checkpoint({"first_stage_model.decoder.conv_in.weight": np.zeros(1)})


# -------------------------------------------------------------------------------------------------------- CLI

def test_cli_animate_writes_video(case, tmp_path):
    """`vldm animate` end to end on the tiny folder (in-process, so the compiled sampler is reused)."""
    import imageio.v3 as iio

    from vldm_jax.cli import main

    Image.fromarray(tiny_svd.make_image(30, 40)).save(tmp_path / "in.png")
    out = tmp_path / "out.gif"
    rc = main(["animate", str(tmp_path / "in.png"), "--checkpoint", str(case.folder), "--out", str(out),
               "--frames", str(RUN["f"]), "--steps", str(RUN["steps"]), "--height", str(RUN["height"]),
               "--width", str(RUN["width"]), "--decode-chunk", str(RUN["chunk"])])
    assert rc == 0
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (RUN["f"], RUN["height"], RUN["width"])
