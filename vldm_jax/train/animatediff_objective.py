"""AnimateDiff motion modules trained by our trainer: the Video LDM temporal objective (the image model's
denoising loss on video clips, spatial layers frozen) with motion modules as the temporal layers.

``objective.name: animatediff`` takes every option of the temporal objective; ``model.temporal`` holds the motion
modules' settings (``motion_num_attention_heads``, ``motion_max_seq_length``, ``use_motion_mid_block``,
``motion_transformer_layers_per_block``...), ``model.motion_adapter`` optionally the adapter to fine-tune. The run
writes ``workdir/temporal.safetensors`` (the motion modules); ``vldm convert workdir/temporal.safetensors DST
--to diffusers-motion-adapter`` makes a diffusers MotionAdapter folder of it.
"""

from __future__ import annotations

import dataclasses

from vldm_jax.errors import ConfigError


def build_animatediff_setup(config):
    from vldm_jax.train.objectives import build_setup

    m = config.model
    temporal = {**dict(m.temporal), "temporal_layer_type": "motion_module"}
    if m.motion_adapter and not m.pretrained:
        raise ConfigError("model.motion_adapter needs model.pretrained (the SD 1.x model the adapter goes into)")
    inner = dataclasses.replace(config, model=dataclasses.replace(m, temporal=temporal, motion_adapter=None),
                                objective=dataclasses.replace(config.objective, name="temporal"))
    setup = build_setup(inner)
    if not m.motion_adapter:
        return setup

    from vldm_jax.checkpoints.animatediff import animatediff_unet, image_unet_of, read_motion_adapter

    adapter = read_motion_adapter(m.motion_adapter)  # a bad file fails before any training work
    init = setup.init_models

    def init_models():
        models = init()
        unet = animatediff_unet(image_unet_of(models.unet), adapter)
        unet.set_remat(m.remat)
        models.unet = unet
        return models

    return dataclasses.replace(setup, init_models=init_models)
