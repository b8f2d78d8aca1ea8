"""TFDS builders built offline: video folder (formats, captions, corrupt files) and moving shapes."""

import numpy as np
import pytest

from tests.data.videos import CAPTIONS, TXT_CAPTIONS, VIDEO_COLORS, VIDEO_NAMES, _frames
from vldm_jax.errors import UserError


def _examples(builder, split="train"):
    return list(builder.as_dataset(split=split).as_numpy_iterator())


def test_tf_sees_no_accelerator(video_build):
    import tensorflow as tf

    assert tf.config.get_visible_devices("GPU") == []
    assert [d.device_type for d in tf.config.get_visible_devices()] == ["CPU"]


def test_video_folder_clips_and_captions(video_build):
    builder, _ = video_build
    examples = _examples(builder)
    by_file = {ex["file"].decode(): ex for ex in examples}
    # 8 frames at stride 2 make one clip of 4 frames per video; every format is read.
    assert sorted(by_file) == sorted(VIDEO_NAMES)
    for name, color in zip(VIDEO_NAMES, VIDEO_COLORS):
        ex = by_file[name]
        assert ex["video"].shape == (4, 16, 16, 3) and ex["video"].dtype == np.uint8
        assert ex["start_frame"] == 0
        # The solid colour survives resize and lossy coding away from the moving bar.
        corner = ex["video"][:, -3:, -3:].reshape(-1, 3).astype(float).mean(axis=0)
        assert np.abs(corner - color).max() < 40, (name, corner, color)
        expected = CAPTIONS.get(name) or TXT_CAPTIONS.get(name) or ""
        assert ex["caption"].decode() == expected
    assert by_file["c.gif"]["fps"] == pytest.approx(4.0, rel=0.1)
    assert by_file["a.mp4"]["fps"] == pytest.approx(4.0)


def test_corrupt_video_is_skipped_and_named(video_build, video_source, tmp_path):
    builder, warnings = video_build
    assert [s["file"] for s in builder.skipped] == ["broken.mp4"]
    assert any("broken.mp4" in w for w in warnings)
    # A finished build is reused, and still knows what it skipped.
    from vldm_jax.data.video_folder import video_folder_builder

    again = video_folder_builder(video_source, builder.data_dir_root, num_frames=4, frame_stride=2, resolution=16)
    assert again.is_prepared() and [s["file"] for s in again.skipped] == ["broken.mp4"]


def test_clip_options(tmp_path):
    from vldm_jax.data.video_folder import prepare_video_folder
    from vldm_jax.io.video import write_video

    source = tmp_path / "gifs"
    source.mkdir()
    for i, color in enumerate(VIDEO_COLORS[:2]):
        write_video(source / f"{i}.gif", _frames(color, n=8, h=24, w=40), fps=8)
    # Stride 1 and 3 frames: 8 source frames give two non-overlapping clips per video;
    # a non-square target is centre-cropped from the covering resize.
    builder = prepare_video_folder(source, tmp_path, num_frames=3, frame_stride=1, resolution=(8, 12))
    examples = _examples(builder)
    assert len(examples) == 4
    assert {int(ex["start_frame"]) for ex in examples} == {0, 3}
    assert examples[0]["video"].shape == (3, 8, 12, 3)
    assert {ex["caption"] for ex in examples} == {b""}
    # clips_per_video caps the clips taken from each video.
    capped = prepare_video_folder(source, tmp_path, num_frames=3, resolution=8, clips_per_video=1)
    assert len(_examples(capped)) == 2
    # A target fps sets the stride from the source rate (8 fps -> 2 fps is stride 4).
    slow = prepare_video_folder(source, tmp_path, num_frames=2, fps=2.0, resolution=8)
    assert {round(float(ex["fps"])) for ex in _examples(slow)} == {2}
    # 4 frames at stride 4 need 13 source frames: nothing is left, and the error says why.
    with pytest.raises(UserError, match=r"no usable clip.*0\.gif \(too short"):
        prepare_video_folder(source, tmp_path, num_frames=4, fps=2.0, resolution=8)


def test_video_folder_user_errors(tmp_path):
    from vldm_jax.data.video_folder import prepare_video_folder

    with pytest.raises(UserError, match="not found"):
        prepare_video_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no video files"):
        prepare_video_folder(tmp_path / "empty", tmp_path / "out")


def test_moving_shapes_builder(shapes_builder):
    from vldm_jax.data.moving_shapes import COLORS, DIRECTIONS, SHAPES, caption_for, example

    examples = _examples(shapes_builder)
    assert len(examples) == 16
    features = shapes_builder.info.features
    for ex in examples:
        assert ex["video"].shape == (8, 32, 32, 3) and ex["video"].dtype == np.uint8
        color = features["color"].int2str(ex["color"])
        shape = features["shape"].int2str(ex["shape"])
        direction = features["direction"].int2str(ex["direction"])
        assert color in COLORS and shape in SHAPES and direction in DIRECTIONS
        assert ex["caption"].decode() == caption_for(color, shape, direction)
    # Stored frames are exactly the numpy renderer's (PNG is lossless), whatever the write order.
    stored = {ex["video"].tobytes() for ex in examples}
    assert stored == {example(i, seed=3, num_frames=8, size=32)["video"].tobytes() for i in range(16)}


def test_moving_shapes_validation_split(tmp_path):
    from vldm_jax.data.moving_shapes import prepare_moving_shapes

    builder = prepare_moving_shapes(tmp_path, num_examples=2, validation_examples=2, num_frames=2, size=16)
    train, val = _examples(builder, "train"), _examples(builder, "validation")
    assert len(train) == len(val) == 2
    assert not {ex["video"].tobytes() for ex in train} & {ex["video"].tobytes() for ex in val}
