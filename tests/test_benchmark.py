"""The benchmark suite (scripts/benchmark.py) runs and writes the JSON its docs and readers rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"median_s", "min_s", "max_s", "q25_s", "q75_s", "n"}


def _run(tmp_path, *extra):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--size", "tiny", "--reps", "1",
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny |" in proc.stdout
    return json.loads(out.read_text())


def _check_compiled(side):
    assert TIMING <= side.keys() and side["n"] == 1
    assert side["compile_s"] > 0 and side["xla_flops"] > 0
    assert 0 < side["fraction_of_matmul_peak"] and side["gflops_per_s"] > 0
    mem = side["memory"]
    assert mem["total_bytes"] == mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"] - mem["alias_bytes"]


def test_one_item_json(tmp_path):
    results = _run(tmp_path, "--only", "clip_text")
    assert results["machine"]["cpu_count"] >= 1 and "jax" in results["machine"]["versions"]
    assert results["matmul_peak"]["gflops_per_s"] > 0 and len(results["load_average_before"]) == 3
    (item,) = results["sizes"]["tiny"]["items"]
    assert item["name"] == "CLIP text encode" and item["speedup_vs_torch"] > 0
    _check_compiled(item["jax"])
    assert TIMING <= item["torch"].keys() and "fraction_of_matmul_peak" in item["torch"]
    assert results["sizes"]["tiny"]["scan_proof"] is None


@pytest.mark.slow  # compiles every tiny model: about 3 minutes on a busy 2-core CPU
def test_tiny_suite_json(tmp_path):
    results = _run(tmp_path)
    tiny = results["sizes"]["tiny"]
    names = [r["name"] for r in tiny["items"]]
    assert len(names) == 8 and names[0] == "video U-Net forward" and names[-1] == "load video U-Net"
    assert names[1] == "temporal training step (AdamW)"
    for r in tiny["items"][:-1]:
        _check_compiled(r["jax"])
        assert TIMING <= r["torch"].keys()
    load = tiny["items"][-1]
    assert TIMING <= load["jax"].keys() and TIMING <= load["jax_converted"].keys() and TIMING <= load["torch"].keys()
    proof = tiny["scan_proof"]
    for key in ("loop_compile_s", "unet_compile_s", "compile_ratio", "per_step_overhead_fraction",
                "paired_per_step_overhead_fraction", "torch_paired_per_step_overhead_fraction"):
        assert isinstance(proof[key], float)


def test_train_step_item(tmp_path):
    results = _run(tmp_path, "--only", "train_step")
    (item,) = results["sizes"]["tiny"]["items"]
    assert item["name"] == "temporal training step (AdamW)" and item["speedup_vs_torch"] > 0
    # The same name rule picks the same temporal parameters on both sides, and only a part of the model.
    n = item["trainable_params"]
    assert n["jax"] == n["torch"] > 0
    side = item["jax"]
    assert TIMING <= side.keys() and side["compile_s"] > 0 and side["xla_flops"] > 0
    assert side["memory"]["temp_bytes"] > 0
