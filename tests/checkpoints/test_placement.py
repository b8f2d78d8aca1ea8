"""Tensors into place in one pass: the threaded prefetch's guesses are checked, never trusted; aligned tensors in
the target layout alias the memory map; the load's breakdown is reported."""

import ml_dtypes
import numpy as np
import pytest

from vldm_jax.checkpoints.convert import torch_to_jax_layout
from vldm_jax.checkpoints.placement import ALIGN, LoadTiming, Prefetch, aligned_empty, last_load_timing, place
from vldm_jax.checkpoints.safetensors_io import read_safetensors, write_safetensors


def _torch_like(tmp_path):
    rng = np.random.default_rng(0)
    sd = {"lin": rng.standard_normal((24, 16)), "conv": rng.standard_normal((8, 4, 3, 3)),
          "proj_in": rng.standard_normal((8, 6, 1, 1)), "emb": rng.standard_normal((10, 8)),
          "conv3d": rng.standard_normal((8, 4, 3, 1, 1)), "bias": rng.standard_normal((24,)),
          "k1": rng.standard_normal((8, 6, 1))}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {k: v.astype(np.float32) for k, v in sd.items()})
    return read_safetensors(path)


# What the key map settles on for each tensor (the embedding keeps its layout; proj_in is a linear layer here).
TARGETS = {"lin": (16, 24), "conv": (3, 3, 4, 8), "proj_in": (6, 8), "emb": None, "conv3d": (3, 1, 1, 4, 8),
           "bias": (24,), "k1": (6, 8)}


@pytest.mark.parametrize("dtype", [None, ml_dtypes.bfloat16])
def test_prefetched_placement_equals_the_layout_rules(tmp_path, dtype):
    sd = _torch_like(tmp_path)
    finals = {k: (sd[k] if TARGETS[k] is None else torch_to_jax_layout(sd[k], TARGETS[k])) for k in sd}
    timing = LoadTiming("test")
    prefetch = Prefetch(sd, dtype, timing)
    want = np.dtype(dtype or np.float32)
    try:
        out = place(finals, {k: want for k in sd}, sources=dict(sd), prefetch=prefetch, timing=timing)
    finally:
        prefetch.close()
    for k, v in out.items():
        assert v.shape == finals[k].shape and v.dtype == want
        np.testing.assert_array_equal(np.asarray(v), finals[k].astype(want))
    # The embedding was guessed transposed (it is 2-D): the guess is dropped; every other guess held.
    assert timing.recopied == 1
    assert timing.bytes == sum(v.nbytes for v in out.values())
    # The file is laid out aligned (our writer): in float32, tensors already in place alias the map.
    in_place = sd["emb"].nbytes + sd["bias"].nbytes if dtype is None else 0
    assert timing.aliased_bytes == in_place and timing.copied_bytes == timing.bytes - in_place


def test_aligned_tensors_alias_the_map(tmp_path):
    path = tmp_path / "ours.safetensors"
    big = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    write_safetensors(path, {"big": big, "odd": np.ones(3, np.float32)})
    stored = read_safetensors(path)
    timing = LoadTiming("test")
    out = place({"big": stored["big"], "odd": stored["odd"], "t": stored["big"].T},
                {"big": np.float32, "odd": np.float32, "t": np.float32}, timing=timing)
    assert out["big"].unsafe_buffer_pointer() == stored["big"].ctypes.data  # no copy: the map is the buffer
    np.testing.assert_array_equal(np.asarray(out["big"]), big)
    np.testing.assert_array_equal(np.asarray(out["t"]), big.T)  # another layout: one copy into place
    assert timing.aliased_bytes == big.nbytes + 12 and timing.copied_bytes == big.nbytes
    assert aligned_empty((5, 7), np.float32).ctypes.data % ALIGN == 0


def test_load_timing_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLDM_LOAD_TIMING", "1")
    timing = LoadTiming("a model")
    with timing.phase("read"):
        pass
    timing.bytes = 2**20
    d = timing.finish()
    assert d["what"] == "a model" and d["read_s"] >= 0 and d["total_s"] >= d["read_s"]
    assert last_load_timing() == d
    err = capsys.readouterr().err
    assert err.startswith("loaded a model: ") and "read " in err and "1 MiB" in err
