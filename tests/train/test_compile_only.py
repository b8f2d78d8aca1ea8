"""``vldm train --compile-only``: the trainer's step lowered with abstract arguments (same program as the one the
loop runs), compiled for a small TPU slice with libtpu on this CPU, and the report's keys and values."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from vldm_jax import cli
from vldm_jax.parallel import aot
from vldm_jax.train import compile_only
from vldm_jax.train.config import load_config

# A micro video U-Net (one level) on cached latents: 2 frames of 8x8x4, text context (77, 16).
MICRO = {
    "model": {"unet": {"sample_size": 8, "block_out_channels": [32], "layers_per_block": 1,
                       "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
                       "mid_block_type": None, "cross_attention_dim": 16, "attention_head_dim": 4,
                       "norm_num_groups": 8},
              "temporal": {"relative_position_dim": 8}, "remat": "none"},
    "data": {"num_frames": 2, "height": 64, "width": 64, "batch_size_per_device": 1},
    "objective": {"encode_in_step": False},
    "optim": {"ema_decay": 0.0},
    "mesh": {"min_shard_size": 0},
    "train": {"threefry_partitionable": False, "compilation_cache": False, "progress": False, "tensorboard": False},
}


def micro_config(*overrides):
    return load_config(data=MICRO, overrides=list(overrides))


def lower_both_ways(config):
    """``(built, state)``: the compile-only path's step (abstract arrays), after asserting that the trainer's path
    (init_state: real arrays; compile_step) lowers to the same program text; ``state`` is the trainer's."""
    from vldm_jax.parallel import mesh as meshlib
    from vldm_jax.train import state as statelib
    from vldm_jax.train.loop import compile_step, in_mesh, init_state
    from vldm_jax.train.objectives import build_setup

    built = compile_only.lower_train_step(config)
    abstract_text = built.lower().as_text()
    setup = build_setup(config)
    mesh = meshlib.make_mesh(config.mesh.data, config.mesh.fsdp)
    tx, schedule = statelib.make_optimizer(config.optim, config.train.steps)
    graphdef, state, shardings = init_state(setup, config, mesh, tx,
                                            setup.objective.trainable_filter(config.model.trainable))
    batch = {k: np.zeros(v.shape, v.dtype) for k, v in built.batch.items()}
    step = compile_step(graphdef, setup, config, tx, schedule, mesh, shardings)
    trainer_text = in_mesh(lambda: step.lower(state, meshlib.global_batch(batch, mesh)), mesh)().as_text()
    assert trainer_text == abstract_text
    return built, state


def test_compile_only_lowers_the_trainers_step():
    """The trainer's path (init_state: real arrays; compile_step) and the compile-only path (abstract arrays) give
    the same lowered program."""
    built, state = lower_both_ways(micro_config())
    assert set(built.batch) == {"latents", "encoder_hidden_states", "image_only_indicator"}
    assert built.params["params_trainable"] == sum(x.size for x in jax.tree.leaves(state.trainable))


@pytest.mark.slow
def test_compile_only_cli_for_a_tpu_slice(tmp_path, capsys):
    pytest.importorskip("libtpu")
    path = tmp_path / "micro.yaml"
    import yaml

    path.write_text(yaml.safe_dump(MICRO))
    report = tmp_path / "r.json"
    rc = cli.main(["train", str(path), "--compile-only", "--topology", "v5e:2x2", "--mesh", "data=2,fsdp=2",
                   "--set", "model.dtype=bfloat16", "--report", str(report)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "TPU v5 lite x4 [data=2,fsdp=2], global batch 4" in out and "fits yes" in out
    r = json.loads(report.read_text())
    assert r["topology"] == "v5e:2x2" and r["devices"] == 4 and r["device_kind"] == "TPU v5 lite"
    assert r["fits"] is True and r["hbm_bytes_per_device"] == 16 * aot.GiB
    assert 0 < r["peak_bytes_per_device"] < r["hbm_bytes_per_device"]
    assert r["global_batch"] == 4 and r["batch_shapes"]["latents"][0] == [4, 2, 8, 8, 4]
    assert r["params_trainable"] > 0 and r["params_total"] > r["params_trainable"] and r["params_other"] == 0
    assert r["flops_per_step"] > 0 and r["est_seconds"] > 0
    # A chip with less memory than the step needs: exit 2 material, one line that says by how much.
    small = dict(r, hbm_bytes=r["peak_bytes"] // 2)
    with pytest.raises(compile_only.DoesNotFit, match=r"GiB over the .* try --set model.remat=full") as e:
        compile_only.check_fits(small, micro_config())
    assert "\n" not in str(e.value)


def test_compile_only_reads_architecture_not_weights():
    # --compile-only implies model.random_init: a folder with config.json files and no weights is enough, and a
    # model.pretrained that names no known architecture is one clear error.
    with pytest.raises(Exception, match="random_init: 'some/folder' is neither"):
        compile_only.lower_train_step(micro_config("model.pretrained=some/folder"))
