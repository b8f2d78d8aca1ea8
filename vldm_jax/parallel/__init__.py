"""Parallelism for training and sampling: the device mesh (``data``, ``fsdp``, ``context``, ``tensor``), the
logical-axis rules that shard parameters (:mod:`~vldm_jax.parallel.mesh`), and the activation shardings that
split a video's frames over devices (:mod:`~vldm_jax.parallel.activations`)."""

from vldm_jax.parallel.activations import activation_mesh, current_mesh
from vldm_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_from_sizes, parse_mesh

__all__ = ["MESH_AXES", "activation_mesh", "current_mesh", "make_mesh", "mesh_from_sizes", "parse_mesh"]
