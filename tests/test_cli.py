"""The CLI's contract for bad input: one line on stderr, exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "vldm_jax.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, err, needle):
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


def test_missing_checkpoint(tmp_path):
    rc, _, err = run_cli("txt2img", "a cat", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png"))
    assert_one_line_error(rc, err, "nope")
    assert not (tmp_path / "a.png").exists()


def test_missing_single_file(tmp_path):
    rc, _, err = run_cli("txt2img", "a cat", "--checkpoint", str(tmp_path / "model.safetensors"),
                         "--out", str(tmp_path / "a.png"))
    assert_one_line_error(rc, err, "model.safetensors")


def test_unknown_scheduler(tmp_path):
    rc, _, err = run_cli("txt2img", "a cat", "--checkpoint", str(tmp_path), "--scheduler", "plms",
                         "--out", str(tmp_path / "a.png"))
    assert_one_line_error(rc, err, "plms")


def test_bad_output_suffix(tmp_path):
    rc, _, err = run_cli("txt2img", "a cat", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "a.txt"))
    assert_one_line_error(rc, err, ".txt")


def test_existing_output_is_kept(tmp_path):
    out = tmp_path / "a.png"
    out.write_bytes(b"precious")
    rc, _, err = run_cli("txt2img", "a cat", "--checkpoint", str(tmp_path), "--out", str(out))
    assert_one_line_error(rc, err, "already exists")
    assert out.read_bytes() == b"precious"


def test_pickle_refused_by_default(tmp_path):
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    rc, _, err = run_cli("txt2img", "a cat", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a.png"))
    assert_one_line_error(rc, err, "pickle")
    assert not (tmp_path / "a.png").exists()


def test_not_a_checkpoint_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 3)
    rc, _, err = run_cli("txt2img", "a cat", "--checkpoint", str(bad), "--out", str(tmp_path / "a.png"))
    assert_one_line_error(rc, err, "safetensors")


def test_argparse_errors_are_one_line():
    rc, _, err = run_cli("txt2img")
    assert_one_line_error(rc, err, "prompt")
    rc, _, err = run_cli("txt2img", "x", "--checkpoint", "c", "--steps", "many")
    assert_one_line_error(rc, err, "--steps")


def test_convert_refuses_existing_destination(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    rc, _, err = run_cli("convert", str(tmp_path / "missing"), str(dst))
    assert rc == 2 and "Traceback" not in err
    assert (dst / "keep.txt").read_text() == "x"
