"""`vldm sample` (resumes after SIGKILL: complete set, no duplicate, no truncated file), `vldm eval fvd` and
`vldm eval clipsim` on tiny models; bad input gives one line and exit 2."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.test_cli import assert_one_line_error
from vldm_jax.cli import main
from vldm_jax.io.video import read_video, write_video

PROMPTS = ["a red circle moving right", "a blue square moving up"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.helpers.tiny_vldm import tiny_pipeline

    path = tmp_path_factory.mktemp("eval") / "tiny_vldm"
    tiny_pipeline().save_pretrained(path)
    return path


def _sample_cmd(checkpoint, prompts, out):
    return [sys.executable, "-m", "vldm_jax.cli", "sample", "--checkpoint", str(checkpoint), "--prompts",
            str(prompts), "--n-per-prompt", "3", "--out", str(out), "--format", "gif", "--frames", "2",
            "--interpolate", "1", "--steps", "2"]


@pytest.mark.slow
def test_sample_resumes_after_sigkill(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "set"
    env = {**os.environ, "VLDM_COMPILATION_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(_sample_cmd(checkpoint, prompts, out), stderr=subprocess.PIPE, text=True, env=env)
    wrote = 0
    for line in proc.stderr:  # kill it as soon as two videos are written, while it works on the third
        wrote += "wrote" in line
        if wrote == 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_before = sorted(p.name for p in out.glob("*.gif"))
    assert 2 <= len(done_before) < 6, done_before

    proc = subprocess.run(_sample_cmd(checkpoint, prompts, out), capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(done_before)} already in" in proc.stderr
    assert proc.stderr.count("wrote") == 6 - len(done_before)
    names = sorted(p.name for p in out.iterdir())
    expected = [f"{i:05d}_{j:03d}.gif" for i in range(2) for j in range(3)]
    assert names == sorted(expected + ["captions.csv"])  # no duplicates, no leftover temporary files
    for name in expected:
        frames, _ = read_video(out / name)  # a truncated GIF would not read back complete
        assert frames.shape == (2, 16, 16, 3)
    rows = (out / "captions.csv").read_text().splitlines()
    assert rows[0] == "video,caption,seed" and rows[4] == "00001_000.gif,a blue square moving up,3"


def test_sample_bad_input(tmp_path, capsys):
    rc = main(["sample", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")])
    assert_one_line_error(rc, capsys.readouterr().err, "prompts file not found")


@pytest.fixture(scope="module")
def i3d_folder(tmp_path_factory):
    """A small random I3D (width 1/8, head pool (2, 2, 2): 16 frames at 64x64) saved in our folder format."""
    from flax import nnx

    from vldm_jax.checkpoints.i3d import save_i3d
    from vldm_jax.models.i3d import I3DConfig, InceptionI3d

    model = InceptionI3d(I3DConfig(num_classes=32, width=0.125, pool_size=(2, 2, 2)), rngs=nnx.Rngs(0))
    return save_i3d(model, tmp_path_factory.mktemp("i3d") / "small_i3d")


def _videos(folder, n, seed, shift=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_video(folder / f"{i}.gif", np.clip(rng.integers(0, 200, (16, 24, 24, 3)) + shift, 0, 255)
                    .astype(np.uint8))


def test_eval_fvd(i3d_folder, tmp_path, capsys):
    _videos(tmp_path / "a", 4, 0)
    _videos(tmp_path / "b", 3, 1, shift=50)
    args = ["eval", "fvd", str(tmp_path / "a"), str(tmp_path / "b"), "--i3d", str(i3d_folder), "--size", "64",
            "--batch", "4"]
    rc = main(args + ["--json", str(tmp_path / "r.json"), "--save-stats", str(tmp_path / "real.npz")])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_real"] == 4 and result["n_generated"] == 3 and result["fvd"] > 0
    # The saved statistics stand in for the real folder and give the same distance.
    rc = main(["eval", "fvd", str(tmp_path / "real.npz"), str(tmp_path / "b"), "--i3d", str(i3d_folder),
               "--size", "64", "--batch", "4", "--json", str(tmp_path / "r2.json")])
    assert rc == 0
    assert json.loads((tmp_path / "r2.json").read_text())["fvd"] == pytest.approx(result["fvd"], rel=1e-9)
    capsys.readouterr()
    rc = main(["eval", "fvd", str(tmp_path / "a"), str(tmp_path / "b"), "--i3d", str(tmp_path / "none.pt")])
    assert_one_line_error(rc, capsys.readouterr().err, "I3D weights not found")


def test_eval_clipsim(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vldm_jax.eval.clipsim import load_clip
    from vldm_jax.models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8)
    clip = tmp_path / "clip"
    transformers.CLIPModel(cfg).save_pretrained(clip)
    load_tokenizer(None).save_pretrained(clip)
    _videos(tmp_path / "v", 2, 0)
    (tmp_path / "p.txt").write_text("a\nb\n")
    rc = main(["eval", "clipsim", str(tmp_path / "v"), "--prompts", str(tmp_path / "p.txt"), "--clip", str(clip),
               "--json", str(tmp_path / "c.json")])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "c.json").read_text())
    sim = load_clip(clip)
    expected = np.mean([sim.score(read_video(tmp_path / "v" / f"{i}.gif")[0][None], [t])[0]
                        for i, t in enumerate("ab")])
    assert result["n_videos"] == 2 and result["clipsim"] == pytest.approx(expected, abs=1e-6)
    (tmp_path / "p.txt").write_text("a\n")
    capsys.readouterr()
    rc = main(["eval", "clipsim", str(tmp_path / "v"), "--prompts", str(tmp_path / "p.txt"), "--clip", str(clip)])
    assert_one_line_error(rc, capsys.readouterr().err, "2 videos but 1 prompts")
