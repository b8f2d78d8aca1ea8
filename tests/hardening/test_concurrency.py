"""Concurrency (issue 23, item 5): one trainer per workdir (a lock file with stale-lock detection by pid), and two
``vldm generate`` processes at once sharing the compilation cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vldm_jax import cli
from vldm_jax.train.loop import WorkdirLock

ROOT = Path(__file__).resolve().parents[2]


def test_second_trainer_refused_with_one_line(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / WorkdirLock.NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        rc = cli.main(["train", str(ROOT / "configs" / "tiny_temporal.yaml"), "--workdir", str(tmp_path),
                       "--data", "moving_shapes:4"])
        lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1 and "in use by another trainer" in lines[0] and str(holder.pid) in lines[0]
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


def test_lock_taken_released_and_stale_taken_over(tmp_path):
    lock = WorkdirLock(tmp_path)
    assert (tmp_path / WorkdirLock.NAME).read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not (tmp_path / WorkdirLock.NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / WorkdirLock.NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")  # a SIGKILLed trainer's
    lock = WorkdirLock(tmp_path)  # stale: taken over
    # Another live process holds it now (us): a second trainer in another process is refused.
    out = subprocess.run([sys.executable, "-c", f"from vldm_jax.train.loop import WorkdirLock; "
                          f"WorkdirLock(__import__('pathlib').Path({str(tmp_path)!r}))"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "in use by another trainer" in out.stderr
    lock.release()


@pytest.mark.slow
def test_two_generates_share_the_compilation_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    # Every program is cached (min compile time 0): on a fast machine the tiny model's compiles take under 0.2 s.
    env.update(PYTHONPATH=str(ROOT), VLDM_COMPILATION_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = [subprocess.Popen([sys.executable, "-m", "vldm_jax.cli", "generate", "a red circle moving right",
                               "--steps", "2", "--interpolate", "1", "--frames", "3", "--seed", str(i),
                               "--out", str(tmp_path / f"v{i}.gif")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    from vldm_jax.io.video import read_video

    a, _ = read_video(tmp_path / "v0.gif")
    b, _ = read_video(tmp_path / "v1.gif")
    assert a.shape == b.shape == (3, 64, 64, 3) and not (a == b).all()  # two seeds, two whole videos
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert any((tmp_path / "cache").iterdir())  # the shared cache was written (by one or both)
