"""The train step in one process: NaN guard, frozen weights, the trainable filter, image-only batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.tiny import (
    classic_threefry,  # noqa: F401 - autouse fixture
    tiny_arrays,
    tiny_config,
    tiny_data,
    tiny_setup,
)
from vldm_jax.parallel import mesh as meshlib
from vldm_jax.train import loop
from vldm_jax.train import state as statelib
from vldm_jax.train.objectives import VideoModels


def host(x):
    return {k: np.asarray(v) for k, v in statelib.flatten(x).items()}


@pytest.fixture(scope="module")
def compiled():
    config = tiny_config()
    setup = tiny_setup()
    mesh = meshlib.make_mesh(1, 1, jax.devices()[:1])
    tx, schedule = statelib.make_optimizer(config.optim, config.train.steps)
    filt = statelib.trainable_filter(config.model.trainable, "unet")
    graphdef, state, shardings = loop.init_state(setup, config, mesh, tx, filt)
    step = loop.compile_step(graphdef, setup, config, tx, schedule, mesh, shardings)
    return dict(config=config, setup=setup, mesh=mesh, tx=tx, schedule=schedule, filt=filt, graphdef=graphdef,
                state=state, shardings=shardings, step=step)


def fresh_state(c):
    return loop.init_state(c["setup"], c["config"], c["mesh"], c["tx"], c["filt"])[1]


def test_trainable_is_the_temporal_part_only(compiled):
    state = compiled["state"]
    trainable = set(statelib.flatten(state.trainable))
    assert trainable == {"unet.temporal_conv.kernel", "unet.temporal_conv.bias", "unet.temporal_mixer.mix_factor"}
    assert "unet.conv_in.kernel" in statelib.flatten(state.frozen)
    # Optimizer moments and the EMA exist for the trainable leaves only.
    opt = {k for k in statelib.flatten(state.opt_state) if k.endswith(("kernel", "bias", "mix_factor"))}
    assert {k.split(".", 4)[-1] for k in opt} == {k.split(".", 1)[1] for k in trainable}
    assert set(statelib.flatten(state.ema)) == trainable


def test_nan_guard_skips_the_update(compiled):
    state = fresh_state(compiled)
    before = host(state)
    bad = tiny_arrays(2)
    bad["latents"][0, 0, 0, 0, 0] = np.nan
    state, metrics = compiled["step"](state, meshlib.global_batch(bad, compiled["mesh"]))
    after = host(state)
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1
    assert int(after["step"]) == 1 and int(after["skipped"]) == 1
    for k, v in before.items():
        if k not in ("step", "skipped"):
            np.testing.assert_array_equal(after[k], v, err_msg=k)
    # The next finite batch updates, with the learning rate of the first applied update.
    state, metrics = compiled["step"](state, meshlib.global_batch(tiny_arrays(2, seed=1), compiled["mesh"]))
    assert bool(metrics["finite"]) and int(metrics["skipped"]) == 1
    assert float(metrics["learning_rate"]) == pytest.approx(float(compiled["schedule"](0)))
    changed = host(state)
    assert not np.array_equal(changed["trainable.unet.temporal_conv.kernel"],
                              before["trainable.unet.temporal_conv.kernel"])


def test_frozen_parameters_are_bit_identical_after_training(tmp_path, compiled):
    config = tiny_config(**{"train.steps": 3, "train.checkpoint_every": 3})
    res = loop.train(config, setup=tiny_setup(), data=tiny_data(2), workdir=tmp_path, echo=lambda m: None)
    model = tiny_setup().init_models()
    _, trainable0, frozen0 = statelib.split_model(model, compiled["filt"])
    frozen_after = host(res.state.frozen)
    for k, v in host(frozen0).items():
        np.testing.assert_array_equal(frozen_after[k], v, err_msg=k)
    assert not np.array_equal(host(res.state.trainable)["unet.temporal_conv.kernel"],
                              host(trainable0)["unet.temporal_conv.kernel"])
    assert [m["step"] for m in res.metrics] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_image_only_batches_give_temporal_layers_no_gradient(compiled):
    """With every frame flagged image-only, alpha = 1 in the AlphaBlender: the temporal branch is unused."""
    setup = tiny_setup()
    model = setup.init_models()
    graphdef, trainable, frozen = statelib.split_model(model, compiled["filt"])
    batch = {k: jnp.asarray(v) for k, v in tiny_arrays(2).items()}

    def grads(indicator):
        b = dict(batch, image_only_indicator=jnp.full((2, 4), indicator, jnp.float32))

        def f(tr):
            return setup.objective.loss(nnx.merge(graphdef, tr, frozen), b, jax.random.key(0))[0]

        return host(jax.grad(f)(trainable))

    images, videos = grads(1.0), grads(0.0)
    assert all(np.all(v == 0) for v in images.values())
    assert all(np.any(v != 0) for k, v in videos.items() if "temporal_conv" in k)


def test_trainable_filter_on_a_video_unet():
    from vldm_jax.models.unet import TemporalConfig, UNet2DConditionConfig, VideoUNet, VideoUNetConfig

    image = UNet2DConditionConfig(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                                  attention_head_dim=2, norm_num_groups=8,
                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config = VideoUNetConfig.from_image_config(image, TemporalConfig.paper(relative_position_dim=8))
    models = nnx.eval_shape(lambda: VideoModels(VideoUNet(config, rngs=nnx.Rngs(0))))
    _, trainable, frozen = statelib.split_model(models, statelib.trainable_filter("temporal"))
    names = list(statelib.flatten(trainable))
    assert names and all("temporal" in n or "time_mixer" in n for n in names)
    assert not any("temporal" in n or "time_mixer" in n for n in statelib.flatten(frozen))
    assert any("time_embedding" in n for n in statelib.flatten(frozen))  # the timestep MLP is spatial
    _, everything, _ = statelib.split_model(models, statelib.trainable_filter("all"))
    _, ups, _ = statelib.split_model(models, statelib.trainable_filter(r"unet\.up_blocks\..*temporal"))
    assert len(statelib.flatten(everything)) > len(names) > len(statelib.flatten(ups)) > 0


class _Echo(nnx.Module):
    """A 'U-Net' that returns a fixed function of its inputs, to read what the objective feeds it."""

    def __init__(self, mode):
        self.mode = mode
        self.w = nnx.Param(jnp.zeros(()))

    def __call__(self, x, t, context, image_only_indicator=None):
        if self.mode == "zeros":
            return jnp.zeros_like(x) + self.w
        return jnp.zeros_like(x) + context.mean(axis=(1, 2))[:, None, None, None, None]


@pytest.mark.parametrize("prediction_type, expected", [("sample", 0.0), ("epsilon", 1.0), ("v_prediction", None)])
def test_objective_targets(prediction_type, expected):
    """Clean latents of zeros: the x0 target is zero (a zero output is exact), the eps target is the unit noise
    (loss ~ 1), the v target is alpha_t * noise (loss below 1)."""
    from vldm_jax.train.objectives import TemporalObjective, noise_schedule

    obj = TemporalObjective(schedule=noise_schedule({"prediction_type": prediction_type}), encode_in_step=False)
    batch = {"latents": jnp.zeros((4, 4, 8, 8, 4)), "encoder_hidden_states": jnp.ones((4, 3, 16))}
    loss, _ = obj.loss(VideoModels(_Echo("zeros")), batch, jax.random.key(0))
    if expected is None:
        assert 0.0 < float(loss) < 1.0
    else:
        assert float(loss) == pytest.approx(expected, abs=0.05)


def test_text_dropout_uses_the_null_context():
    from vldm_jax.train.objectives import TemporalObjective, noise_schedule

    obj = TemporalObjective(schedule=noise_schedule({"prediction_type": "sample"}), encode_in_step=False,
                            text_dropout=1.0, null_condition=np.zeros((3, 16), np.float32))
    batch = {"latents": jnp.zeros((2, 4, 8, 8, 4)), "encoder_hidden_states": jnp.ones((2, 3, 16))}
    loss, _ = obj.loss(VideoModels(_Echo("context")), batch, jax.random.key(0))
    assert float(loss) == 0.0  # the model saw the all-zero null context, not the ones


def test_remat_policy_traces_in_the_train_step():
    from tests.train.test_cli_train import CONFIG, SMALL
    from vldm_jax.train.config import load_config
    from vldm_jax.train.objectives import build_setup

    config = load_config(CONFIG, SMALL + ["model.remat=full"])
    setup = build_setup(config)
    tx, schedule = statelib.make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda: statelib.new_train_state(
        *statelib.split_model(setup.init_models(), statelib.trainable_filter("temporal"))[1:], tx, seed=0, ema=True))
    graphdef = statelib.split_model(nnx.eval_shape(setup.init_models), statelib.trainable_filter("temporal"))[0]
    step = statelib.make_train_step(graphdef, setup.objective.loss, tx, schedule, 0.9)
    batch = setup.objective.host_batch({"video": np.zeros((1, 2, 16, 16, 3), np.float32), "caption": ["x"]})
    jax.eval_shape(step, abstract, {k: jnp.asarray(v) for k, v in batch.items() if k != "caption"})
