"""`vldm upscale` end to end on a tiny x4 upscaler folder (tiled), and its bad-input handling: one line on
stderr, exit code 2, no output file."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

from tests.helpers.tiny_upscaler import make_tiny_upscaler_folder  # noqa: E402
from vldm_jax.cli import main  # noqa: E402
from vldm_jax.io.video import read_video, write_video  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_upscaler_folder(tmp_path_factory.mktemp("x4cli"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "in.gif"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
    write_video(path, frames, fps=5)
    return path


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.slow
def test_upscale_writes_a_readable_video_four_times_larger(folder, clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    rc, err = _run(capsys, "upscale", clip, "--checkpoint", folder, "--out", out, "--steps", 2, "--tile-size", 8,
                   "--tile-overlap", 2, "--prompt", "a cat", "--noise-level", 30, "--fps", 6)
    assert rc == 0, err
    frames, fps = read_video(out)
    assert frames.shape == (3, 48, 64, 3) and abs(fps - 6) < 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("case", ["missing", "tile_size", "tile_multiple", "exists", "noise_level", "format"])
def test_bad_input_is_one_line_exit_2_and_no_file(case, folder, clip, tmp_path, capsys):
    out = tmp_path / "out.gif"
    args = ["upscale", clip, "--checkpoint", folder, "--out", out, "--steps", 1]
    expect = {"missing": "not found", "tile_size": "--tile-size", "tile_multiple": "multiple of 4",
              "exists": "already exists", "noise_level": "noise_level", "format": "unsupported output format"}[case]
    if case == "missing":
        args[1] = tmp_path / "nope.mp4"
    elif case == "tile_size":
        args += ["--tile-size", 0]
    elif case == "tile_multiple":
        args += ["--tile-size", 6]
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "noise_level":
        args += ["--noise-level", 351]
    elif case == "format":
        args[5] = out = tmp_path / "out.txt"
    rc, err = _run(capsys, *args)
    lines = [l for l in err.strip().splitlines() if l.startswith("vldm")]
    assert rc == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
