"""Logical axis rules -> partition specs, mesh sizes (no devices needed: rules read only the mesh's shape)."""

import types

import pytest
from jax.sharding import PartitionSpec as P

from vldm_jax.errors import ConfigError
from vldm_jax.parallel.mesh import DEFAULT_RULES, logical_axes, mesh_shape, partition_spec


def fake_mesh(data, fsdp):
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp})


def test_logical_axes_by_leaf_name_and_rank():
    assert logical_axes(("conv", "kernel"), (3, 3, 32, 64)) == ("spatial", "spatial", "in", "out")
    assert logical_axes(("proj", "kernel"), (32, 64)) == ("in", "out")
    assert logical_axes(("token_embedding", "embedding"), (49408, 32)) == ("vocab", "out")
    assert logical_axes(("norm", "scale"), (64,)) == ("channels",)
    assert logical_axes(("count",), ()) == ()


def test_rules_shard_the_first_divisible_axis_over_fsdp():
    mesh = fake_mesh(2, 4)
    assert partition_spec(("k", "kernel"), (3, 3, 32, 64), mesh) == P(None, None, None, "fsdp")
    # 'out' does not divide by 4: the next rule ('in') takes fsdp.
    assert partition_spec(("k", "kernel"), (3, 3, 32, 6), mesh) == P(None, None, "fsdp", None)
    assert partition_spec(("k", "kernel"), (3, 3, 6, 6), mesh) == P()
    assert partition_spec(("e", "embedding"), (49408, 30), mesh) == P("fsdp", None)
    assert partition_spec(("n", "bias"), (64,), mesh) == P()  # vectors replicate under the default rules
    # Small parameters stay replicated.
    assert partition_spec(("k", "kernel"), (32, 64), mesh, DEFAULT_RULES, min_shard_size=4096) == P()


def test_rules_from_config_can_use_both_axes():
    rules = [["out", ["data", "fsdp"]], ["in", "fsdp"]]
    assert partition_spec(("k", "kernel"), (32, 64), fake_mesh(2, 4), rules) == P(None, ("data", "fsdp"))
    with pytest.raises(ConfigError, match="tensor"):
        partition_spec(("k", "kernel"), (32, 64), fake_mesh(2, 4), [["out", "tensor"]])


def test_mesh_shape_fills_and_checks():
    assert mesh_shape(-1, 1, 8) == (8, 1, 1, 1)
    assert mesh_shape(2, -1, 8) == (2, 4, 1, 1)
    assert mesh_shape(1, 1, 1) == (1, 1, 1, 1)
    assert mesh_shape(1, 2, 8, context=-1) == (1, 2, 4, 1)
    with pytest.raises(ConfigError, match="there are 3"):
        mesh_shape(2, 2, 3)
    with pytest.raises(ConfigError, match="divide"):
        mesh_shape(-1, 3, 8)
