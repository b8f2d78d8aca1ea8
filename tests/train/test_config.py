"""Training configs: YAML into typed dataclasses, --set overrides, errors that name the key."""

from pathlib import Path

import pytest

from vldm_jax.errors import ConfigError
from vldm_jax.train.config import Config, apply_overrides, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_tiny_temporal_loads_with_overrides():
    cfg = load_config(CONFIGS / "tiny_temporal.yaml",
                      ["optim.learning_rate=1e-3", "train.steps=7", "data.path=/videos", "mesh.fsdp=2",
                       "model.temporal.merge_factor=0.25", "train.threefry_partitionable=null"])
    assert isinstance(cfg, Config)
    assert cfg.optim.learning_rate == 1e-3 and isinstance(cfg.optim.learning_rate, float)  # YAML 1.1 reads a str
    assert cfg.train.steps == 7 and cfg.data.path == "/videos" and cfg.mesh.fsdp == 2
    assert cfg.model.temporal == {"relative_position_dim": 16, "merge_factor": 0.25}
    assert cfg.train.threefry_partitionable is None
    assert cfg.model.unet["block_out_channels"] == [32, 64]


@pytest.mark.parametrize("override, needle", [
    (["optim.learnin_rate=1"], "optim.learnin_rate"),
    (["train.steps=many"], "train.steps"),
    (["bogus.x=1"], "bogus"),
    (["optim.ema_decay=1.5"], "ema_decay"),
    (["train.steps"], "key=value"),
    (["model.dtype=float64"], "model.dtype"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(CONFIGS / "tiny_temporal.yaml", override)


def test_overrides_copy_and_create_sections():
    base = {"optim": {"b1": 0.9}}
    out = apply_overrides(base, ["optim.b2=0.95", "mesh.rules=[[out, fsdp]]"])
    assert base == {"optim": {"b1": 0.9}}
    assert out == {"optim": {"b1": 0.9, "b2": 0.95}, "mesh": {"rules": [["out", "fsdp"]]}}


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
