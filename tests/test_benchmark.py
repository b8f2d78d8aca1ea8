"""The benchmark suite (scripts/benchmark.py) runs and writes the JSON its docs and readers rely on."""

from __future__ import annotations

import importlib.util
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
    results = _run(tmp_path, "--only", "clip_text", "--settle", "1")
    assert results["machine"]["cpu_count"] >= 1 and "jax" in results["machine"]["versions"]
    assert results["settle"] == 1
    assert results["matmul_peak"]["gflops_per_s"] > 0 and len(results["load_average_before"]) == 3
    (item,) = results["sizes"]["tiny"]["items"]
    assert item["name"] == "CLIP text encode" and item["speedup_vs_torch"] > 0
    _check_compiled(item["jax"])
    assert TIMING <= item["torch"].keys() and "fraction_of_matmul_peak" in item["torch"]
    assert item["jax"]["settle"] == item["torch"]["settle"] == 1 and item["jax"]["interleaved"]
    assert results["sizes"]["tiny"]["scan_proof"] is None


def test_settle_counts_untimed_calls():
    # Loaded from its file, as the other script tests do (no sys.path change leaks into later tests).
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    calls = []
    ours, theirs = (lambda: calls.append("o")), (lambda: calls.append("t"))
    jt, tt = benchmark.time_pair(ours, theirs, reps=2, warmup=1, settle=2)
    # warm-up o t, then per rep: 2 untimed + 1 timed of ours, then the same of theirs
    assert "".join(calls) == "ot" + ("ooo" + "ttt") * 2
    assert jt["n"] == tt["n"] == 2 and jt["settle"] == 2
    calls.clear()
    benchmark.time_pair(ours, theirs, reps=2, warmup=0, settle=0)
    assert "".join(calls) == "otot"


def test_bad_settle_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--settle", "-1",
                           "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--settle must be at least 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


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
    assert TIMING <= load["numpy_read"].keys() and load["over_numpy_read"] > 0
    (b, *_) = load["jax"]["breakdown"]
    assert {"read_s", "build_s", "convert_s", "place_s", "total_s"} <= b.keys() and b["copied_bytes"] > 0
    assert load["jax_converted"]["breakdown"][0]["aliased_bytes"] > 0
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


def _bench_main():
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "benchmark.py"), run_name="bench_test")["main"]


def _results(times):
    return {"sizes": {"tiny": {"items": [
        {"name": n, "jax": {"median_s": t}, "torch": {"median_s": 1.0}, "speedup_vs_torch": 1.0 / t}
        for n, t in times.items()]}}}


def test_baseline_comparison(tmp_path, capsys):
    main = _bench_main()
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_results({"a": 1.0, "b": 1.0, "gone": 1.0})))
    new.write_text(json.dumps(_results({"a": 1.05, "b": 1.5, "new": 1.0})))
    assert main(["--results", str(new), "--baseline", str(old), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| tiny | ")
            and line.count("|") == 8}
    assert set(rows) == {"a", "b"}  # only rows present in both runs
    assert "| 1.05 |" in rows["a"] and "REGRESSION" not in rows["a"]
    assert "| 1.50 |" in rows["b"] and "REGRESSION" in rows["b"] and "1.00x -> 0.67x" in rows["b"]
    assert "1 regression of 2 rows" in out
    assert main(["--results", str(new), "--baseline", str(old), "--fail-on-regression"]) == 1
    assert main(["--results", str(new), "--baseline", str(old), "--threshold", "0.6", "--fail-on-regression"]) == 0


def test_bad_baseline_is_one_line_exit_2(tmp_path, capsys):
    from vldm_jax.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"items": []}))
    for path, msg in ((tmp_path / "missing.json", "not found"), (bad, "not valid JSON"),
                      (foreign, "not a benchmark results file")):
        assert main(["benchmark", "--baseline", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vldm benchmark: error:") and msg in err, err


def test_progress_bar():
    import io

    from vldm_jax.cli_benchmark import Progress

    stream = io.StringIO()
    bar = Progress(2, stream=stream, width=4)
    bar.step("first")
    bar.step("second")
    bar.step("an unplanned third")  # grows instead of overflowing
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[....] 0/2 ") and lines[0].endswith("first")
    assert lines[1].startswith("[##..] 1/2 ") and lines[2].startswith("[###.] 2/3 ")
    assert lines[-1].startswith("[####] 3/3 ") and lines[-1].endswith("done")
