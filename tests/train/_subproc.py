"""Running tests/train/_worker.py in subprocesses and reading its RESULT line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def env(devices: int = 1, **extra) -> dict:
    e = dict(os.environ)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    e["XLA_FLAGS"] = " ".join(flags)
    e["JAX_PLATFORMS"] = "cpu"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def start(*args, devices: int = 1, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=ROOT, env=env(devices, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, dict | None, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    found = [l for l in out.splitlines() if l.startswith("RESULT ")]
    return proc.returncode, (json.loads(found[-1][len("RESULT "):]) if found else None), err


def run(*args, devices: int = 1, timeout: float = 240, **extra) -> tuple[int, dict | None, str]:
    return finish(start(*args, devices=devices, **extra), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
