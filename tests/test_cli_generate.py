"""`vldm generate`, `vldm animate` (Video LDM) and `vldm interpolate` on a tiny random pipeline folder: playable
GIF/MP4 files read back; bad input gives one line, exit 2, no file."""

import numpy as np
import pytest

from tests.test_cli import assert_one_line_error, run_cli
from vldm_jax.cli import main
from vldm_jax.io.video import read_video


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.helpers.tiny_vldm import tiny_pipeline

    path = tmp_path_factory.mktemp("cli") / "tiny_vldm"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def image(tmp_path):
    import imageio.v3 as iio

    path = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    iio.imwrite(path, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return path


def _run_in_process(capsys, *args):
    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_generate_gif_and_interpolate_mp4(checkpoint, tmp_path, capsys):
    gif = tmp_path / "v.gif"
    rc, err = _run_in_process(capsys, "generate", "a red circle moving right", "--checkpoint", str(checkpoint),
                              "--out", str(gif), "--frames", "2", "--interpolate", "4", "--steps", "2")
    assert rc == 0, err
    frames, fps = read_video(gif)
    assert frames.shape == (5, 16, 16, 3)
    assert fps == pytest.approx(16, rel=0.05)  # the model's 4 fps times the interpolation factor

    mp4 = tmp_path / "v.mp4"
    rc, err = _run_in_process(capsys, "interpolate", str(gif), "--checkpoint", str(checkpoint), "--out", str(mp4),
                              "--steps", "2")
    assert rc == 0, err
    frames, _ = read_video(mp4)
    assert frames.shape == (17, 16, 16, 3)


@pytest.mark.slow
def test_animate_mp4(checkpoint, image, tmp_path, capsys):
    out = tmp_path / "a.mp4"
    rc, err = _run_in_process(capsys, "animate", str(image), "--checkpoint", str(checkpoint), "--out", str(out),
                              "--prompt", "a red circle moving right", "--frames", "4", "--steps", "2")
    assert rc == 0, err
    frames, _ = read_video(out)
    assert frames.shape == (4, 16, 16, 3)


def test_size_not_a_multiple_of_the_latent_factor(checkpoint, tmp_path, capsys):
    out = tmp_path / "v.gif"
    rc, err = _run_in_process(capsys, "generate", "x", "--checkpoint", str(checkpoint), "--out", str(out),
                              "--height", "15", "--steps", "1")
    assert_one_line_error(rc, err, "multiples of 2")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--frames", "0"], "--frames"),
    (["--steps", "0"], "--steps"),
    (["--interpolate", "3"], "--interpolate"),
    (["--fps", "0"], "--fps"),
    (["--out", "video.png"], ".png"),
])
def test_generate_bad_arguments(tmp_path, args, needle):
    out = tmp_path / "v.gif"
    argv = ["generate", "x", "--checkpoint", str(tmp_path), "--out", str(out), *args]
    if "--out" in args:
        argv = ["generate", "x", "--checkpoint", str(tmp_path), *args]
    rc, _, err = run_cli(*argv, cwd=tmp_path)
    assert_one_line_error(rc, err, needle)
    assert not out.exists() and not (tmp_path / "video.png").exists()


def test_animate_unreadable_image(tmp_path, checkpoint):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "v.gif"
    rc, _, err = run_cli("animate", str(bad), "--checkpoint", str(checkpoint), "--out", str(out))
    assert_one_line_error(rc, err, "bad.png")
    assert not out.exists()


def test_animate_unknown_interpolate(tmp_path, image, checkpoint):
    out = tmp_path / "v.gif"
    rc, _, err = run_cli("animate", str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--interpolate", "8")
    assert_one_line_error(rc, err, "--interpolate")
    assert not out.exists()


def test_interpolate_bad_factor_and_missing_video(tmp_path):
    rc, _, err = run_cli("interpolate", str(tmp_path / "nope.gif"), "--out", str(tmp_path / "o.gif"), "--factor", "3")
    assert_one_line_error(rc, err, "--factor")
    rc, _, err = run_cli("interpolate", str(tmp_path / "nope.gif"), "--out", str(tmp_path / "o.gif"))
    assert_one_line_error(rc, err, "nope.gif")
    assert not (tmp_path / "o.gif").exists()


def test_not_a_video_ldm_folder(tmp_path):
    rc, _, err = run_cli("generate", "x", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "v.gif"))
    assert_one_line_error(rc, err, "model_index.json")


@pytest.mark.slow
def test_second_run_uses_the_persistent_compilation_cache(checkpoint, tmp_path):
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "VLDM_COMPILATION_CACHE": str(tmp_path / "cache")}
    times = []
    for name in ("a.gif", "b.gif"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vldm_jax.cli", "generate", "x", "--checkpoint", str(checkpoint),
                               "--out", str(tmp_path / name), "--frames", "2", "--steps", "2"],
                              capture_output=True, text=True, env=env, timeout=300)
        times.append(time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "cache").iterdir())
    # Same seed, same output: the cached programs compute what the freshly compiled ones did.
    a, _ = read_video(tmp_path / "a.gif")
    b, _ = read_video(tmp_path / "b.gif")
    np.testing.assert_array_equal(a, b)
    print(f"first run {times[0]:.1f}s, second {times[1]:.1f}s")
