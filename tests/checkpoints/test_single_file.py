"""Original single-file SD 1.x / 2.x checkpoints: key maps, inferred configs, file reading, NNX parity.

The fixture (tiny diffusers/transformers models turned into CompVis/Stability key names by
``tests/helpers/tiny_sd.py``) is itself checked against diffusers' converters, so the loader is tested
against an independently validated file.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.loaders import single_file_utils as dsf  # noqa: E402

from tests.helpers import tiny_sd  # noqa: E402
from vldm_jax.checkpoints.single_file import (  # noqa: E402
    OPENCLIP_PREFIX,
    SingleFileComponents,
    build_single_file_models,
    load_single_file,
    split_original_checkpoint,
    unet_rename_table,
)
from vldm_jax.errors import CheckpointError, ConfigError  # noqa: E402

VARIANTS = ("sd1", "sd2")


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


class Case:
    """Tiny torch components of one variant, their original-format dict and a .safetensors file of it."""

    def __init__(self, variant, folder):
        self.variant = variant
        self.components = tiny_sd.make_tiny_sd_components(variant, seed=3 if variant == "sd2" else 0)
        self.original = tiny_sd.original_state_dict(self.components, variant)
        self.path = tiny_sd.write_original_single_file(self.components, folder / f"{variant}.safetensors", variant)
        self.loaded = load_single_file(self.path)
        self.text_sd = tiny_sd.text_state_dict(self.components["text_encoder"])

    def numpy_original(self):
        return {k: v.numpy() for k, v in self.original.items()}


_CASES: dict = {}


def _case(variant, tmp_path_factory):
    if variant not in _CASES:
        _CASES[variant] = Case(variant, tmp_path_factory.mktemp(f"single_file_{variant}"))
    return _CASES[variant]


@pytest.fixture(scope="module", params=VARIANTS)
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd1_case(tmp_path_factory):
    return _case("sd1", tmp_path_factory)


@pytest.fixture(scope="module")
def sd2_case(tmp_path_factory):
    return _case("sd2", tmp_path_factory)


# --------------------------------------------------------------------------------- the fixture itself

def test_fixture_matches_diffusers_converters(case):
    """diffusers' own single-file converters turn our original-format dict back into the diffusers weights."""
    c, sd = case.components, case.original
    for model, converted in ((c["unet"], dsf.convert_ldm_unet_checkpoint(sd, dict(c["unet"].config))),
                             (c["vae"], dsf.convert_ldm_vae_checkpoint(sd, dict(c["vae"].config)))):
        ref = model.state_dict()
        assert set(converted) == set(ref)
        assert all(torch.equal(converted[k], ref[k]) for k in ref)
    if case.variant == "sd1":
        text = dsf.convert_ldm_clip_checkpoint(sd)
        extra = {"text_model.embeddings.position_ids"}
    else:
        # diffusers drops OpenCLIP's block 23 by name; our tower is shorter, so its last block comes back.
        text = dsf.convert_open_clip_checkpoint(c["text_encoder"], sd)
        last = c["text_encoder"].config.num_hidden_layers
        extra = {k for k in text if k.startswith(f"text_model.encoder.layers.{last}.")}
        assert len(extra) == 16
    assert set(text) - extra == set(case.text_sd)
    assert all(torch.equal(text[k], case.text_sd[k]) for k in case.text_sd)


# ------------------------------------------------------------------------------------------------ split

UNET_FIELDS = ("in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
               "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
               "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
               "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
               "dual_cross_attention", "use_linear_projection", "class_embed_type", "num_class_embeds",
               "upcast_attention", "resnet_time_scale_shift")
VAE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "scaling_factor", "force_upcast",
              "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id",
               "eos_token_id", "pad_token_id")


def _assert_same_weights(got, ref_torch):
    assert set(got) == set(ref_torch), sorted(set(got) ^ set(ref_torch))[:10]
    bad = [k for k in ref_torch if got[k].shape != tuple(ref_torch[k].shape)
           or not np.array_equal(np.asarray(got[k]), ref_torch[k].numpy())]
    assert not bad, bad[:10]


def test_split_configs_match_diffusers(case):
    comp = split_original_checkpoint(case.numpy_original())
    c = case.components
    assert comp.variant == case.variant
    for fields, ours, ref in ((UNET_FIELDS, comp.unet_config, c["unet"].config),
                              (VAE_FIELDS, comp.vae_config, c["vae"].config),
                              (TEXT_FIELDS, comp.text_config, c["text_encoder"].config.to_dict())):
        diffs = {f: (ours[f], ref[f]) for f in fields if _plain(ours[f]) != _plain(ref[f])}
        assert not diffs
    assert comp.unet_config["_class_name"] == "UNet2DConditionModel"
    assert comp.vae_config["_class_name"] == "AutoencoderKL"
    assert comp.text_config["architectures"] == ["CLIPTextModel"]
    assert comp.unet_config["sample_size"] == (96 if case.variant == "sd2" else 64)
    sched = comp.scheduler_config
    assert (sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"], sched["beta_schedule"],
            sched["set_alpha_to_one"], sched["steps_offset"], sched["clip_sample"], sched["timestep_spacing"]) == \
        (1000, 0.00085, 0.012, "scaled_linear", False, 1, False, "leading")
    assert comp.prediction_type == tiny_sd.prediction_type_of(case.variant)
    assert comp.clip_skip == 0
    assert comp.text_layers_dropped == (1 if case.variant == "sd2" else 0)


def test_split_weights_equal_diffusers(case):
    comp = split_original_checkpoint(case.numpy_original())
    _assert_same_weights(comp.unet_state_dict, case.components["unet"].state_dict())
    _assert_same_weights(comp.vae_state_dict, case.components["vae"].state_dict())
    _assert_same_weights(comp.text_state_dict, case.text_sd)


def test_load_single_file_safetensors(case):
    comp = case.loaded
    assert isinstance(comp, SingleFileComponents)
    _assert_same_weights(comp.unet_state_dict, case.components["unet"].state_dict())
    _assert_same_weights(comp.vae_state_dict, case.components["vae"].state_dict())
    _assert_same_weights(comp.text_state_dict, case.text_sd)
    # Read zero-copy: renamed (and q/k/v-split) weights are still views of the memory map.
    assert not comp.unet_state_dict["conv_in.weight"].flags.owndata
    assert not comp.text_state_dict["text_model.encoder.layers.0.self_attn.k_proj.weight"].flags.owndata


def test_unet_table_is_data():
    table = dict(unet_rename_table(4, 2))
    assert table[r"input_blocks\.3\.0\.op\.(weight|bias)"] == r"down_blocks.0.downsamplers.0.conv.\1"
    assert table[r"input_blocks\.10\.0\.(.+)"] == r"down_blocks.3.resnets.0.\1"
    assert table[r"output_blocks\.5\.[12]\.conv\.(weight|bias)"] == r"up_blocks.1.upsamplers.0.conv.\1"
    assert r"output_blocks\.11\.[12]\.conv\.(weight|bias)" not in table  # the top level does not upsample


# ---------------------------------------------------------------------------- prediction type, pickles

def test_prediction_type_rules(tmp_path, case):
    sd = case.numpy_original()
    if case.variant == "sd1":
        assert split_original_checkpoint(sd).prediction_type == "epsilon"
        assert split_original_checkpoint(sd, prediction_type="v_prediction").prediction_type == "v_prediction"
        return
    assert split_original_checkpoint(sd).prediction_type == "v_prediction"
    assert split_original_checkpoint(sd, global_step=110000).prediction_type == "v_prediction"  # 2.1 768-v
    base = split_original_checkpoint(sd, global_step=875000)  # 2.0 512-base
    assert (base.prediction_type, base.unet_config["sample_size"]) == ("epsilon", 64)
    assert split_original_checkpoint({**sd, "global_step": np.array(875000)}).prediction_type == "epsilon"
    assert split_original_checkpoint(sd, global_step=875000, prediction_type="v_prediction").prediction_type == \
        "v_prediction"
    path = tiny_sd.write_original_single_file(case.components, tmp_path / "base.safetensors", "sd2",
                                              global_step=875000)
    assert load_single_file(path).prediction_type == "epsilon"
    assert load_single_file(path, prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="prediction_type"):
        split_original_checkpoint(sd, prediction_type="x0")


def test_ckpt_needs_allow_pickle(tmp_path, sd2_case):
    case = sd2_case
    path = tiny_sd.write_original_single_file(case.components, tmp_path / "model.ckpt", "sd2", global_step=875000)
    with pytest.raises(CheckpointError, match="pickle"):
        load_single_file(path)
    comp = load_single_file(path, allow_pickle=True)
    assert (comp.global_step, comp.prediction_type) == (875000, "epsilon")
    _assert_same_weights(comp.unet_state_dict, case.components["unet"].state_dict())
    _assert_same_weights(comp.text_state_dict, case.text_sd)


def test_half_precision_file_keeps_its_dtype(tmp_path, sd1_case):
    case = sd1_case
    path = tiny_sd.write_original_single_file(case.components, tmp_path / "fp16.safetensors", "sd1",
                                              dtype=torch.float16)
    comp = load_single_file(path)
    ref = case.components["unet"].state_dict()
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight"):
        assert comp.unet_state_dict[key].dtype == np.float16
        assert np.array_equal(comp.unet_state_dict[key], ref[key].half().numpy())


# ----------------------------------------------------------------------------------------------- errors

def test_errors_name_the_problem(tmp_path, case):
    sd = case.numpy_original()
    with pytest.raises(CheckpointError, match="SDXL"):
        split_original_checkpoint({**sd, "conditioner.embedders.0.transformer.text_model.x.weight": np.zeros(1)})
    with pytest.raises(CheckpointError, match="no text encoder"):
        split_original_checkpoint({k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")})
    with pytest.raises(CheckpointError, match="no VAE"):
        split_original_checkpoint({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")})
    with pytest.raises(CheckpointError, match="no U-Net"):
        split_original_checkpoint({k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")})
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.middle_block\.7\.weight"):
        split_original_checkpoint({**sd, "model.diffusion_model.middle_block.7.weight": np.zeros(1)})
    with pytest.raises(CheckpointError, match="label_emb"):
        split_original_checkpoint({**sd, "model.diffusion_model.label_emb.0.0.weight": np.zeros((4, 4))})
    with pytest.raises(CheckpointError, match="not found"):
        load_single_file(tmp_path / "missing.safetensors")
    # Training leftovers and buffers that are not part of the networks are ignored.
    extra = {"model_ema.decay": np.array(0.9999), "betas": np.zeros(1000), "first_stage_model.loss.logvar": np.zeros(1)}
    if case.variant == "sd2":
        extra[OPENCLIP_PREFIX + "attn_mask"] = np.zeros((77, 77))
        extra[OPENCLIP_PREFIX + "visual.proj"] = np.zeros((4, 4))
    split_original_checkpoint({**sd, **extra})


# ------------------------------------------------------------- SD2 penultimate layer (pipeline-level output)

def _open_clip_penultimate(sd, ids):
    """OpenCLIP text tower as SD 2.x runs it (FrozenOpenCLIPEmbedder, layer="penultimate"), straight from the
    original keys: all blocks but the last, then ln_final. Fused in_proj goes through torch's own MHA."""
    import torch.nn.functional as F

    p = OPENCLIP_PREFIX
    d = sd[p + "ln_final.weight"].shape[0]
    t = ids.shape[1]
    x = sd[p + "token_embedding.weight"][ids] + sd[p + "positional_embedding"][:t]
    mask = torch.full((t, t), float("-inf")).triu(1)
    n = len({k.split(".")[4] for k in sd if k.startswith(p + "transformer.resblocks.")})
    for i in range(n - 1):
        r = f"{p}transformer.resblocks.{i}."
        h = F.layer_norm(x, (d,), sd[r + "ln_1.weight"], sd[r + "ln_1.bias"]).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(
            h, h, h, d, d // 64, sd[r + "attn.in_proj_weight"], sd[r + "attn.in_proj_bias"], None, None, False, 0.0,
            sd[r + "attn.out_proj.weight"], sd[r + "attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (d,), sd[r + "ln_2.weight"], sd[r + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[r + "mlp.c_fc.weight"], sd[r + "mlp.c_fc.bias"])),
                         sd[r + "mlp.c_proj.weight"], sd[r + "mlp.c_proj.bias"])
    return F.layer_norm(x, (d,), sd[p + "ln_final.weight"], sd[p + "ln_final.bias"])


@pytest.fixture(scope="module")
def token_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49406, size=(2, 77))
    ids[:, 0], ids[:, 20:] = 49406, 49407
    return ids


def test_sd2_text_is_openclip_penultimate(sd2_case, token_ids):
    case = sd2_case
    from transformers import CLIPTextConfig, CLIPTextModel

    comp = case.loaded
    with torch.no_grad():
        ref = _open_clip_penultimate(case.original, torch.from_numpy(token_ids)).numpy()
        cfg = {k: v for k, v in comp.text_config.items() if k not in ("architectures", "model_type")}
        model = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
        target = model.state_dict()
        sd = {k: torch.from_numpy(np.array(v)) for k, v in comp.text_state_dict.items()}
        if not any(k.startswith("text_model.") for k in target):
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True)
        out = model(torch.from_numpy(token_ids)).last_hidden_state.numpy()
    err = _rel_err(out, ref)
    print(f"sd2 text: transformers CLIPTextModel (N-1 layers) vs OpenCLIP penultimate: rel err {err:.2e}")
    assert err < 1e-5


# ------------------------------------------------------------------------------------- NNX models (parity)

@pytest.fixture(scope="module")
def nnx_models(case):
    return build_single_file_models(case.loaded)


def test_nnx_unet_forward_matches_diffusers(case, nnx_models):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    unet = nnx_models["unet"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, unet.config.cross_attention_dim)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    with torch.no_grad():
        ref = case.components["unet"](torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    graphdef, state = nnx.split(unet)
    out = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                                            jnp.asarray(t), jnp.asarray(ctx))
    err = _rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref)
    print(f"{case.variant} U-Net from single file vs diffusers: rel err {err:.2e}")
    assert err < 1e-4


def test_nnx_vae_decode_matches_diffusers(case, nnx_models):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    z = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = case.components["vae"].decode(torch.from_numpy(z)).sample.numpy()
    graphdef, state = nnx.split(nnx_models["vae"])
    out = jax.jit(lambda s, a: nnx.merge(graphdef, s).decode(a))(state, jnp.asarray(z.transpose(0, 2, 3, 1)))
    err = _rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref)
    print(f"{case.variant} VAE decode from single file vs diffusers: rel err {err:.2e}")
    assert err < 1e-4


def test_nnx_text_matches_pipeline_context(case, nnx_models, token_ids):
    """What diffusers' SD pipelines feed the U-Net: last_hidden_state of the (N-1 layer, for SD2) text model;
    for SD2 also equal to OpenCLIP's penultimate layer + ln_final computed from the original keys."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    with torch.no_grad():
        ref = case.components["text_encoder"](torch.from_numpy(token_ids)).last_hidden_state.numpy()
    graphdef, state = nnx.split(nnx_models["text_encoder"])
    clip_skip = case.loaded.clip_skip
    out = np.asarray(jax.jit(lambda s, a: nnx.merge(graphdef, s).encode(a, clip_skip=clip_skip))(
        state, jnp.asarray(token_ids, jnp.int32)))
    err = _rel_err(out, ref)
    print(f"{case.variant} text context from single file vs transformers: rel err {err:.2e}")
    assert err < 1e-4
    if case.variant == "sd2":
        with torch.no_grad():
            oc = _open_clip_penultimate(case.original, torch.from_numpy(token_ids)).numpy()
        err = _rel_err(out, oc)
        print(f"sd2 text context from single file vs OpenCLIP penultimate reference: rel err {err:.2e}")
        assert err < 1e-4


# --------------------------------------------------------------------- the shared pipeline-folder helper

@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_pipeline_folder_round_trip(tmp_path, variant):
    """The pipeline folder the pipeline tests use runs in diffusers, and its single-file form splits back into
    exactly the folder's weights and the tokenizer's vocabulary size."""
    from diffusers import StableDiffusionPipeline

    from vldm_jax.checkpoints.load import find_folder_weights
    from vldm_jax.models.tokenizer import load_tokenizer

    folder = tiny_sd.make_tiny_sd_pipeline_folder(tmp_path, variant)
    assert (folder / "tokenizer" / "vocab.json").exists() and (folder / "tokenizer" / "merges.txt").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.scheduler.config.prediction_type == tiny_sd.prediction_type_of(variant)
    assert pipe.tokenizer.pad_token == ("!" if variant == "sd2" else "<|endoftext|>")
    image = pipe("a photo of a cat", num_inference_steps=1, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    comp = load_single_file(tiny_sd.write_original_single_file(folder, tmp_path / "model.safetensors", variant))
    assert comp.variant == variant and comp.prediction_type == tiny_sd.prediction_type_of(variant)
    for name, ours in (("unet", comp.unet_state_dict), ("vae", comp.vae_state_dict)):
        ref = find_folder_weights(folder / name)
        assert set(ours) == set(ref) and all(np.array_equal(ours[k], ref[k]) for k in ref)
    ref = {(k if k.startswith("text_model.") else "text_model." + k): v
           for k, v in find_folder_weights(folder / "text_encoder").items() if not k.endswith("position_ids")}
    assert set(comp.text_state_dict) == set(ref)
    assert all(np.array_equal(comp.text_state_dict[k], ref[k]) for k in ref)
    # Our tokenizer reads the folder's vocabulary and gives the ids of the bundled one (what a single file uses).
    ours, bundled = load_tokenizer(folder), load_tokenizer(None)
    assert len(ours) == comp.text_config["vocab_size"] == 49408
    assert ours("a photo of a cat").input_ids == bundled("a photo of a cat").input_ids


# ------------------------------------------------------------------------- full-size shapes (no weights)

SD15 = dict(
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
              attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768))
SD21 = dict(
    unet=dict(SD15["unet"], cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
              upcast_attention=True),
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              hidden_act="gelu", projection_dim=1024))  # OpenCLIP text_projection is (1024, 1024)


@pytest.mark.parametrize("variant,spec", [("sd1", SD15), ("sd2", SD21)], ids=VARIANTS)
def test_full_size_configs_inferred(variant, spec):
    """The published SD 1.5 / 2.1 architectures, as shape-only (meta) tensors, give their diffusers configs."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**spec["unet"])
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(**spec["text"], bos_token_id=0, eos_token_id=2))
    sd = tiny_sd.original_state_dict({"unet": unet, "vae": vae, "text_encoder": text}, variant)
    shapes = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}
    comp = split_original_checkpoint(shapes)
    assert comp.variant == variant
    for fields, ours, ref in ((UNET_FIELDS, comp.unet_config, unet.config), (VAE_FIELDS, comp.vae_config, vae.config),
                              (TEXT_FIELDS, comp.text_config, text.config.to_dict())):
        assert not {f: (ours[f], ref[f]) for f in fields if _plain(ours[f]) != _plain(ref[f])}
    assert (comp.vae_config["sample_size"], comp.unet_config["sample_size"]) == \
        ((768, 96) if variant == "sd2" else (512, 64))
    assert len(comp.unet_state_dict) == len(unet.state_dict())
    assert len(comp.text_state_dict) == len(text.state_dict())
