"""The protocol scripts' data handling (no model): UCF-101 class names -> prompts and the allocation of the
10,000 samples; MSR-VTT captions from CSV and from the dataset's JSON."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ucf101_prompts_and_allocation():
    ucf = _load("eval_ucf101")
    assert ucf.prompt_of("ApplyEyeMakeup") == "apply eye makeup"
    assert ucf.prompt_of("YoYo") == "yo yo"
    assert ucf.class_of(Path("/d/flat/v_PlayingCello_g03_c02.avi")) == "PlayingCello"
    assert ucf.class_of(Path("/d/Biking/clip1.avi")) == "Biking"
    counts = Counter({"A": 10, "B": 20, "C": 71})
    alloc = ucf.allocate(counts, 10000)
    assert sum(alloc.values()) == 10000
    assert all(abs(alloc[c] - 10000 * counts[c] / 101) < 1 for c in counts)
    uniform = ucf.allocate(Counter({c: i + 1 for i, c in enumerate("abcdefg")}), 100, uniform=True)
    assert sum(uniform.values()) == 100 and max(uniform.values()) - min(uniform.values()) <= 1


def test_msrvtt_captions(tmp_path):
    msr = _load("eval_msrvtt")
    (tmp_path / "c.csv").write_text("video_id,caption\nvideo7,a man sings\nvideo7,someone sings \nvideo9,a cat\n")
    assert msr.read_captions(tmp_path / "c.csv", False) == {"video7": ["a man sings", "someone sings"],
                                                             "video9": ["a cat"]}
    (tmp_path / "t.json").write_text(json.dumps({"sentences": [{"video_id": "video9", "caption": "a cat",
                                                                "sen_id": 1}]}))
    assert msr.read_captions(tmp_path / "t.json", True) == {"video9": ["a cat"]}
