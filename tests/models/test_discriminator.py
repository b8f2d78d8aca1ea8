"""The 3D patch discriminator: shapes, hinge losses, and that it learns to tell clips apart."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers.random_params import random_model
from vldm_jax.errors import ConfigError
from vldm_jax.models.discriminator import PatchDiscriminator3D, PatchDiscriminator3DConfig, hinge_d_loss, hinge_g_loss

TINY = PatchDiscriminator3DConfig(base_channels=32, num_layers=2)


def logits_shape(config, shape):
    model = nnx.eval_shape(lambda: PatchDiscriminator3D(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(shape, jnp.float32))
    return model, out


def test_patch_logits_shape():
    _, out = logits_shape(TINY, (2, 4, 32, 32, 3))
    # 32 -> 16 (conv_in) -> 8 (strided) -> 7 -> 6 (two stride-1 k4 p1 convs); frames kept.
    assert out.shape == (2, 4, 6, 6, 1) and out.dtype == jnp.float32
    down = PatchDiscriminator3DConfig(base_channels=32, num_layers=3, temporal_downsample=True)
    model, out = logits_shape(down, (1, 8, 64, 64, 3))
    assert out.shape == (1, 2, 6, 6, 1)
    assert TINY.channels == (32, 64, 128)
    assert [c.kernel.shape for c in model.convs][0] == (3, 4, 4, 32, 64)
    assert model.convs[0].bias is None  # a norm follows


def test_hinge_losses():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    np.testing.assert_allclose(hinge_d_loss(real, fake), 0.5 * (5 / 6 + 1), rtol=1e-6)
    np.testing.assert_allclose(hinge_g_loss(fake), 1 / 3, rtol=1e-6)
    assert float(hinge_d_loss(jnp.full(3, 5.0), jnp.full(3, -5.0))) == 0.0


def test_discriminator_learns_real_from_fake():
    """Real clips: a square moving smoothly; fake: the same clips with per-frame flicker. A few Adam steps
    lower the hinge loss."""
    rng = np.random.default_rng(0)
    frames = np.full((4, 4, 16, 16, 3), -1.0, np.float32)
    for b in range(4):
        for t in range(4):
            y, x = 2 + t + b, 3 + t
            frames[b, t, y:y + 5, x:x + 5] = 0.8
    real = jnp.asarray(frames)
    fake = jnp.asarray(frames + rng.choice([-0.4, 0.4], size=(4, 4, 1, 1, 1)).astype(np.float32))

    model = random_model(lambda: PatchDiscriminator3D(TINY, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tx = optax.adam(5e-4, b1=0.5, b2=0.9)
    opt = tx.init(state)

    @jax.jit
    def step(state, opt):
        def loss_fn(s):
            d = nnx.merge(graphdef, s)
            return hinge_d_loss(d(real), d(fake))
        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    losses = []
    for _ in range(20):
        state, opt, loss = step(state, opt)
        losses.append(float(loss))
    print("discriminator hinge loss:", [round(v, 3) for v in losses])
    assert np.mean(losses[-3:]) < 0.5 * losses[0]


def test_bad_configs():
    with pytest.raises(ConfigError):
        PatchDiscriminator3DConfig(norm="batch")
    with pytest.raises(ConfigError):
        PatchDiscriminator3DConfig(base_channels=24)
    with pytest.raises(ConfigError):
        PatchDiscriminator3DConfig(temporal_kernel=2)
