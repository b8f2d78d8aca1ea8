"""Ahead-of-time compiles for a TPU slice on this CPU machine (libtpu; nothing runs on a TPU): a tiny video U-Net
forward with frames over ``context``, the splash attention kernel under shard_map, and the host-device report."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vldm_jax.errors import ConfigError
from vldm_jax.parallel import aot
from vldm_jax.parallel.activations import batch_sharding, video_sharding
from vldm_jax.parallel.mesh import make_mesh

pytest.importorskip("libtpu")

TOPOLOGY = "v5e:2x2"
REPORT_KEYS = {"argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "hbm_bytes", "fits", "flops",
               "est_seconds", "est_source", "compile_seconds", "device_kind", "num_devices", "mesh"}


@pytest.fixture(scope="module")
def slice_mesh():
    devices = aot.topology_devices(TOPOLOGY)
    return make_mesh(1, 1, devices, context=len(devices))


def test_tiny_video_unet_forward_compiles_for_a_tpu_slice(slice_mesh):
    from vldm_jax.models.unet import UNet2DConditionConfig, VideoUNet, VideoUNetConfig

    image = UNet2DConditionConfig(sample_size=8, block_out_channels=(32,), layers_per_block=1, cross_attention_dim=16,
                                  attention_head_dim=2, mid_block_type=None, down_block_types=("CrossAttnDownBlock2D",),
                                  up_block_types=("CrossAttnUpBlock2D",))
    config = VideoUNetConfig.from_image_config(image)
    mesh = slice_mesh
    graph, state = aot.abstract_module(lambda rngs: VideoUNet(config, rngs=rngs, dtype=jnp.bfloat16))
    state = aot.abstract_sharded(state, mesh, dtype=jnp.bfloat16)
    shape = (1, 8, 16, 16, 4)
    x = aot.abstract_array(shape, jnp.bfloat16, video_sharding(mesh, shape))
    text = aot.abstract_array((1, 7, 16), jnp.bfloat16, batch_sharding(mesh, (1, 7, 16)))
    assert x.sharding.spec[:2] == (None, "context")  # 8 frames over 4 devices

    @jax.jit
    def forward(state, x, text):
        return nnx.merge(graph, state)(x, jnp.zeros((1,)), text)

    compiled, report = aot.compile_report(forward, state, x, text, mesh=mesh, name="tiny")
    row = report.as_dict()
    assert REPORT_KEYS <= set(row)
    assert row["device_kind"] == "TPU v5 lite" and row["num_devices"] == 4 and row["mesh"]["context"] == 4
    assert row["hbm_bytes"] == 16 * aot.GiB and row["fits"] is True
    # Memory is per device and in the TPU's tiled layouts (small minor dimensions padded to 128 lanes): at least
    # the bf16 weights (replicated) and this device's 2 of the 8 frames.
    assert row["argument_bytes"] >= aot.total_bytes(state) + 16 * 16 * 4 * 2 * 2
    assert row["peak_bytes"] >= row["argument_bytes"] + row["output_bytes"] > 0
    assert row["flops"] > 0 and row["est_seconds"] > 0 and row["est_source"] in ("xla", "flops/peak")
    assert row["compile_seconds"] > 0
    # Frames over context: temporal attention trades frames for positions, one all-to-all.
    assert "all-to-all" in compiled.as_text()
    assert "TPU v5 lite x4 [context=4]" in report.summary()


def test_splash_attention_compiles_under_a_mesh(slice_mesh):
    from vldm_jax.nn import attention as attn

    mesh = slice_mesh
    q = aot.abstract_array((8, 256, 2, 40), jnp.bfloat16, NamedSharding(mesh, P("context")))

    @jax.jit
    def f(q, k, v):
        return attn.dot_product_attention(q, k, v)

    compiled, report = aot.compile_report(f, q, q, q, mesh=mesh, name="splash")
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Pallas kernel, not XLA's attention
    assert report.flops is not None and report.peak_bytes > 0
    # Relative-position bias: splash has none, so the call takes XLA's path (no kernel).
    bias = aot.abstract_array((1, 2, 256, 256), jnp.bfloat16, NamedSharding(mesh, P()))
    compiled, _ = aot.compile_report(jax.jit(lambda q, b: attn.dot_product_attention(q, q, q, bias=b)), q, bias,
                                     mesh=mesh)
    assert "tpu_custom_call" not in compiled.as_text()


def test_host_devices_without_a_topology():
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    _, report = aot.compile_report(jax.jit(lambda a: (a @ a).sum()), x, mesh=None, name="matmul")
    assert report.platform == "cpu" and report.num_devices == 1 and report.argument_bytes == 64 * 64 * 4
    assert report.hbm_bytes is None and report.fits is None and report.flops >= 2 * 64 ** 3
    assert aot.target_devices(None) == jax.devices()


def test_bad_topology_is_one_line_error():
    with pytest.raises(ConfigError, match="v5e:3x3x3x3"):
        aot.topology_devices("v5e:3x3x3x3")
