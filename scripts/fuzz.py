"""Coverage-guided fuzzing (atheris) of the readers of files a user hands us; not part of CI.

    pip install atheris
    python scripts/fuzz.py safetensors --seconds 60     # also: config, video
    python scripts/fuzz.py video --seconds 60 --corpus /tmp/fuzz_video

Each target feeds the fuzzer's bytes to one reader through a file; a UserError is the expected outcome for bad
input, anything else is a crash that atheris reports with the input that caused it (saved as crash-*). Every
crash found becomes a regression example in tests/hardening/ (the hypothesis tests' @example lists).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
TMP = Path(tempfile.mkdtemp(prefix="vldm_fuzz_"))


def _target(name: str):
    from vldm_jax.errors import UserError

    if name == "safetensors":
        from vldm_jax.checkpoints.load import read_safetensors as read
        path = TMP / "w.safetensors"
    elif name == "config":
        from vldm_jax.models.config import read_config_file as read
        path = TMP / "config.json"
    elif name == "video":
        from vldm_jax.io.video import read_video as read
        path = TMP / "in.gif"
    else:
        raise SystemExit(f"unknown target {name}")

    def one(data: bytes) -> None:
        path.write_bytes(data)
        try:
            read(path)
        except UserError:
            pass

    return one


def _seed(target: str, corpus: Path) -> None:
    """Valid files to start from: mutations of a real file reach past the first check."""
    import numpy as np

    if target == "safetensors":
        from vldm_jax.checkpoints.safetensors_io import write_safetensors

        write_safetensors(corpus / "seed", {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                            "b": np.ones(4, np.uint8)}, {"k": "v"})
    elif target == "config":
        (corpus / "seed").write_text('{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16]}')
    else:
        from vldm_jax.io.video import write_video

        write_video(corpus / "seed.gif", np.zeros((3, 4, 4, 3), np.uint8) + np.arange(3)[:, None, None, None] * 60)
        (corpus / "seed.gif").rename(corpus / "seed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=("safetensors", "config", "video"))
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--corpus", default=None, help="corpus folder (kept between runs)")
    args = p.parse_args()
    import atheris

    # Coverage of our readers only: the heavy libraries are imported first, uninstrumented.
    import imageio.v3  # noqa: F401,E401
    from flax import nnx  # noqa: F401

    with atheris.instrument_imports(include=["vldm_jax"]):
        one = _target(args.target)
    argv = [sys.argv[0], f"-max_total_time={args.seconds}", "-rss_limit_mb=4096", "-print_final_stats=1"]
    corpus = Path(args.corpus or tempfile.mkdtemp(prefix=f"vldm_fuzz_{args.target}_"))
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        _seed(args.target, corpus)
    argv.append(str(corpus))
    atheris.Setup(argv, one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
