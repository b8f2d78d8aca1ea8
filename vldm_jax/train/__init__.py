"""Training: sharded, resumable training of Video LDM stages.

    vldm train configs/tiny_temporal.yaml --data path/to/videos --workdir runs/tiny

or from Python::

    from vldm_jax.train import load_config, train

    config = load_config("configs/tiny_temporal.yaml", ["data.path=moving_shapes:64", "train.steps=20"])
    result = train(config, workdir="runs/tiny")      # resumes when runs/tiny has checkpoints

Modules: :mod:`~vldm_jax.train.config` (YAML -> dataclasses, ``--set`` overrides), :mod:`~vldm_jax.train.mesh`
(device mesh, logical-axis sharding rules, multi-host batches), :mod:`~vldm_jax.train.state` (train state,
optimizer, the jitted step with its NaN guard), :mod:`~vldm_jax.train.objectives` (the objective interface and the
temporal fine-tuning loss), :mod:`~vldm_jax.train.loop` (checkpoints, logging, preemption, resume).
"""

from vldm_jax.train.config import Config, load_config
from vldm_jax.train.loop import ArrayBatches, TrainResult, train
from vldm_jax.train.objectives import Setup, TemporalObjective, VideoModels, build_setup
from vldm_jax.train.state import TrainState

__all__ = ["Config", "load_config", "train", "TrainResult", "ArrayBatches", "Setup", "TemporalObjective",
           "VideoModels", "build_setup", "TrainState"]
