"""Tiny datasets built once per test session (TF import and builds are the slow part)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from tests.data.videos import TXT_CAPTIONS, VIDEO_COLORS, VIDEO_NAMES, _frames, _write_avi


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def video_source(tmp_path_factory):
    from vldm_jax.io.video import write_video

    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    for name, color in zip(VIDEO_NAMES, VIDEO_COLORS):
        frames = _frames(color)
        if name.endswith(".avi"):
            _write_avi(os.fspath(root / name), frames, 8)
        else:
            write_video(root / name, frames, fps=8)
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / ".hidden.mp4").write_bytes(b"not even looked at")
    (root / "captions.csv").write_text('file,caption\na.mp4,"first, with a comma"\nc.gif,from the csv\n')
    for name, text in TXT_CAPTIONS.items():
        (root / name).with_suffix(".txt").write_text(text + "\n")
    return root


@pytest.fixture(scope="session")
def video_build(video_source, tmp_path_factory):
    """(builder, warnings logged during the build) for 8 clips of 4 frames (stride 2) at 16x16."""
    from vldm_jax.data.video_folder import prepare_video_folder

    records = _Records()
    logger = logging.getLogger("vldm_jax.data")
    logger.addHandler(records)
    try:
        builder = prepare_video_folder(video_source, tmp_path_factory.mktemp("tfds"), num_frames=4,
                                       frame_stride=2, resolution=16)
    finally:
        logger.removeHandler(records)
    return builder, records.messages


@pytest.fixture(scope="session")
def shapes_builder(tmp_path_factory):
    from vldm_jax.data.moving_shapes import prepare_moving_shapes

    return prepare_moving_shapes(tmp_path_factory.mktemp("shapes"), num_examples=16, num_frames=8, size=32, seed=3)
