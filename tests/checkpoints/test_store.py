"""Our weight store: standard safetensors, aligned for zero-copy, atomic folder writes."""

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from vldm_jax.checkpoints.placement import last_load_timing
from vldm_jax.checkpoints.safetensors_io import read_safetensors, write_safetensors
from vldm_jax.checkpoints.store import atomic_folder, load_converted, save_module
from vldm_jax.errors import CheckpointError, UserError
from vldm_jax.models.clip import CLIPTextConfig, CLIPTextModel


def test_written_file_is_standard_and_aligned(tmp_path):
    import ml_dtypes

    arrays = {"big": np.arange(4096, dtype=np.float32).reshape(64, 64), "small": np.arange(3, dtype=np.float32),
              "half": np.ones((32, 2), np.float16), "ids": np.arange(16, dtype=np.int64),
              "bf": np.ones((16,), ml_dtypes.bfloat16)}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, arrays, metadata={"who": "test"})
    ours = read_safetensors(path)
    plain = {k: v for k, v in arrays.items() if k != "bf"}
    write_safetensors(tmp_path / "p.safetensors", plain)
    ref = safetensors.numpy.load_file(str(tmp_path / "p.safetensors"))
    for k, v in plain.items():
        np.testing.assert_array_equal(ref[k], v)
    for k, v in arrays.items():
        np.testing.assert_array_equal(ours[k], v)
        assert ours[k].dtype == v.dtype
    assert ours["big"].ctypes.data % 64 == 0  # large tensors can alias into device buffers


def test_module_round_trip_and_atomic_folder(tmp_path):
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)
    model = CLIPTextModel(cfg, rngs=nnx.Rngs(1))
    dst = tmp_path / "text"
    with atomic_folder(dst) as tmp:
        save_module(model, tmp)
        assert not dst.exists()  # nothing under the final name until the write is complete
    loaded = load_converted(dst)
    timing = last_load_timing()  # our format is in place: its aligned tensors alias the file's memory map
    assert timing["aliased_bytes"] > timing["copied_bytes"] and timing["recopied_tensors"] == 0
    assert timing["bytes"] == sum(np.asarray(v.get_value()).nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
    a, b = nnx.state(model), nnx.state(loaded)
    for (p, x), (q, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert p == q
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()))
    with pytest.raises(UserError, match="already exists"):
        with atomic_folder(dst):
            pass
    # A failing write leaves neither a partial folder nor a change to the existing one.
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "other") as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]


def test_corrupted_store_names_the_problem(tmp_path):
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16)
    dst = tmp_path / "text"
    with atomic_folder(dst) as tmp:
        save_module(CLIPTextModel(cfg, rngs=nnx.Rngs(0)), tmp)
    arrays = dict(read_safetensors(dst / "params.safetensors"))
    key = next(k for k in arrays if k.endswith("final_layer_norm.scale"))
    del arrays[key]
    write_safetensors(dst / "params.safetensors", {k: np.array(v) for k, v in arrays.items()})
    with pytest.raises(CheckpointError, match="final_layer_norm"):
        load_converted(dst)
