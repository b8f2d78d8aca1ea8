"""`vldm animate` with bad input: one line on stderr, exit code 2, nothing written (checked before any model load)."""

import numpy as np
import pytest

from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture
def image(tmp_path):
    import imageio.v3 as iio

    path = tmp_path / "in.png"
    iio.imwrite(path, np.zeros((24, 32, 3), np.uint8))
    return path


def test_missing_image(tmp_path):
    out = tmp_path / "v.mp4"
    rc, _, err = run_cli("animate", str(tmp_path / "nope.png"), "--checkpoint", str(tmp_path), "--out", str(out))
    assert_one_line_error(rc, err, "nope.png")
    assert not out.exists()


def test_not_an_image(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    rc, _, err = run_cli("animate", str(bad), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "v.gif"))
    assert_one_line_error(rc, err, "notes.png")
    assert not (tmp_path / "v.gif").exists()


def test_bad_output_suffix(tmp_path, image):
    rc, _, err = run_cli("animate", str(image), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "v.png"))
    assert_one_line_error(rc, err, ".png")


@pytest.mark.parametrize("args, needle", [
    (["--height", "20"], "--height"),
    (["--width", "0"], "--width"),
    (["--frames", "0"], "--frames"),
    (["--steps", "0"], "--steps"),
    (["--decode-chunk", "0"], "--decode-chunk"),
    (["--noise-aug", "-0.5"], "--noise-aug"),
])
def test_bad_numbers(tmp_path, image, args, needle):
    out = tmp_path / "v.mp4"
    rc, _, err = run_cli("animate", str(image), "--checkpoint", str(tmp_path), "--out", str(out), *args)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


def test_existing_output_is_kept(tmp_path, image):
    out = tmp_path / "v.gif"
    out.write_bytes(b"precious")
    rc, _, err = run_cli("animate", str(image), "--checkpoint", str(tmp_path), "--out", str(out))
    assert_one_line_error(rc, err, "already exists")
    assert out.read_bytes() == b"precious"


def test_missing_checkpoint(tmp_path, image):
    out = tmp_path / "v.gif"
    rc, _, err = run_cli("animate", str(image), "--checkpoint", str(tmp_path / "svd_xt.safetensors"), "--out", str(out))
    assert_one_line_error(rc, err, "svd_xt.safetensors")
    assert not out.exists()


def test_without_checkpoint_the_bundled_model_checks_the_size(tmp_path):
    """No --checkpoint: the bundled Video LDM animates; an image whose size is not a multiple of its VAE factor
    (4) is refused in one line, nothing written."""
    import imageio.v3 as iio

    odd = tmp_path / "odd.png"
    iio.imwrite(odd, np.zeros((30, 30, 3), np.uint8))
    out = tmp_path / "v.gif"
    rc, _, err = run_cli("animate", str(odd), "--out", str(out))
    assert_one_line_error(rc, err, "multiples of 4")
    assert not out.exists()
