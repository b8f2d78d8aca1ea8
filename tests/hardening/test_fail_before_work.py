"""Fail before working: every error a user can cause is found before the first denoising step (issue 23, item 4).

Each case runs the real CLI entry point; a denoising step would print a progress bar on stderr, so "one line on
stderr, exit 2, no output file" shows the request was refused before any sampling started."""

import pytest

from vldm_jax import cli


@pytest.fixture(scope="module")
def bundled():
    return cli._load_video_ldm(None)


@pytest.fixture(autouse=True)
def _load_once(monkeypatch, bundled):
    # The real bundled pipeline, loaded once for the module (loading is not the work these tests are about).
    monkeypatch.setattr(cli, "_load_video_ldm", lambda checkpoint: bundled)


def _run(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, [l for l in err.splitlines() if l.strip()]


@pytest.mark.parametrize("extra, message", [
    (["--upscale"], "has no upsampler"),
    (["--interpolate", "4", "--frames", "1"], "needs at least 2 keyframes"),
    (["--height", "62"], "multiples of"),
    (["--scheduler", "nope"], "unknown --scheduler"),
    (["--out", "{tmp}/x.avi"], "unsupported output format"),
    (["--out", "{tmp}/missing/x.gif"], "does not exist"),
])
def test_generate_refuses_up_front(tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    argv = ["generate", "a red circle moving right", "--out", str(tmp_path / "v.gif"), *extra]
    rc, lines = _run(argv, capsys)
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines
    assert not list(tmp_path.glob("*.gif"))


def test_convert_checks_destination_before_loading(tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    # The source does not even exist: the destination error comes first, so nothing was loaded.
    rc, lines = _run(["convert", str(tmp_path / "no-such-model"), str(tmp_path / "dst")], capsys)
    assert rc == 2 and len(lines) == 1 and "already exists" in lines[0], lines


def test_unwritable_output_folder(tmp_path, capsys):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        out = ro / "v.gif"
        if os.access(ro, os.W_OK):  # root writes anywhere: an output "folder" that is a file cannot be written either
            (tmp_path / "a_file").write_text("")
            out = tmp_path / "a_file" / "v.gif"
        rc, lines = _run(["generate", "x", "--out", str(out)], capsys)
        assert rc == 2 and "not writable" in lines[0]
    finally:
        ro.chmod(0o700)
