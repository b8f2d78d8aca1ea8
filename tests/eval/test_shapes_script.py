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
