"""scripts/evaluate_shapes.py on rendered clips: the real row right, the shuffled row failing."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate_shapes.py"


def _load():
    spec = importlib.util.spec_from_file_location("evaluate_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_and_shuffled_rows(tmp_path, capsys):
    script = _load()
    out = tmp_path / "summary.json"
    assert script.main(["--real", "24", "--frames", "8", "--size", "48", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["real"]["n"] == 24 and summary["real"]["ok"] == 1.0
    assert summary["real, frames shuffled"]["r2_pass"] < 0.2
    assert "rows" not in summary["real"]
    table = capsys.readouterr().out
    assert "| real " in table and "frames shuffled" in table
    assert len(script.PROMPTS) == 60


def test_new_row_helpers_and_renderer_rows(tmp_path, capsys):
    """Issue 22: prompt subsets, downscaling, the sharpness figure against bicubic, a seam column, real clips of
    the held-out renderer setting."""
    import numpy as np

    script = _load()
    twelve = script.prompt_subset(12)
    assert len(twelve) == 12 and len(set(twelve)) == 12 and script.prompt_subset(None) == script.PROMPTS
    for word in ("red", "green", "blue", "yellow", "white", "circle", "square", "triangle", "left", "right", "up",
                 "down"):
        assert any(f" {word} " in f" {p} " for p in twelve), word
    rng = np.random.default_rng(0)
    low = rng.uniform(size=(1, 2, 8, 8, 3))
    np.testing.assert_allclose(script.downscale(np.repeat(np.repeat(low, 4, 2), 4, 3), 4), low, atol=1e-12)
    assert abs(script.sharpness_ratio(script.bicubic(low, 4), low) - 1.0) < 1e-6
    assert script.sharpness_ratio(np.repeat(np.repeat(low, 4, 2), 4, 3), low) > 1.0  # blocky: sharper edges
    out = tmp_path / "s.json"
    assert script.main(["--real", "12", "--frames", "5", "--real-settings", "held_out", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["real (held_out renderer)"]["ok"] == 1.0
    table = script.table({"x": {**json.loads(out.read_text())["real"], "seams_ok": 0.5}})
    assert "no seam jump" in table and "50.0 |" in table.splitlines()[-1]
