"""The batch pipeline: shapes and ranges, per-host shards, determinism, exact resume, image mode."""

import logging

import numpy as np
import pytest

from vldm_jax.errors import ConfigError, UserError


def _iterator(builder, **kw):
    from vldm_jax.data.pipeline import DataIterator

    kw.setdefault("num_processes", 1)
    kw.setdefault("process_index", 0)
    kw.setdefault("batch_size", 4)
    return DataIterator(builder, **kw)


def _ids(batch):
    # Moving-shapes clips are all different, so their bytes identify them.
    return [v.tobytes() for v in np.rint((batch["video"] + 1.0) * 127.5).astype(np.uint8)]


def _same(a, b):
    return all(np.array_equal(x["video"], y["video"]) and x["caption"] == y["caption"] for x, y in zip(a, b))


def test_batches_shapes_ranges_and_content(shapes_builder):
    from vldm_jax.data.moving_shapes import caption_for, example

    it = _iterator(shapes_builder, seed=0)
    assert it.steps_per_epoch == 4 and it.output_shape() == (4, 8, 32, 32, 3)
    rendered = {}
    for i in range(16):
        ex = example(i, seed=3, num_frames=8, size=32)
        rendered[ex["video"].tobytes()] = ex
    seen = []
    for _ in range(4):
        batch = next(it)
        video = batch["video"]
        assert video.shape == (4, 8, 32, 32, 3) and video.dtype == np.float32
        assert video.min() >= -1.0 and video.max() <= 1.0 and video.min() == -1.0
        np.testing.assert_array_equal(batch["image_only_indicator"], np.zeros((4, 8), np.float32))
        assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
        for key, caption in zip(_ids(batch), batch["caption"]):
            ex = rendered[key]  # frames come back exactly, in [-1, 1]
            assert caption == caption_for(ex["color"], ex["shape"], ex["direction"])
            seen.append(key)
    # One epoch is a permutation of the dataset.
    assert sorted(seen) == sorted(rendered)


def test_order_is_a_function_of_seed_and_epoch(shapes_builder):
    first = [next(_iterator(shapes_builder, seed=5)) for _ in range(1)]
    a = _iterator(shapes_builder, seed=5)
    epoch0 = [next(a) for _ in range(4)]
    epoch1 = [next(a) for _ in range(4)]
    assert _same(first, epoch0[:1])
    assert _same(epoch0, [next(_iterator(shapes_builder, seed=5)) for _ in range(1)] + epoch0[1:])
    flat = lambda batches: [k for b in batches for k in _ids(b)]  # noqa: E731
    assert flat(epoch0) != flat(epoch1) and sorted(flat(epoch0)) == sorted(flat(epoch1))
    other = _iterator(shapes_builder, seed=6)
    assert flat([next(other) for _ in range(4)]) != flat(epoch0)


def test_hosts_read_disjoint_equal_shards(shapes_builder):
    shards = []
    for index in range(3):
        it = _iterator(shapes_builder, batch_size=2, num_processes=3, process_index=index, seed=1)
        assert it.num_examples == 5 and it.steps_per_epoch == 2  # 16 // 3, the remainder dropped
        keys = [k for _ in range(2) for k in _ids(next(it))]
        # A whole epoch on one host never repeats an example ...
        shards.append(set(keys))
        assert len(shards[-1]) == 4
    # ... and no example is on two hosts, in any epoch.
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    whole = set()
    for index in range(2):
        it = _iterator(shapes_builder, batch_size=8, num_processes=2, process_index=index, seed=1)
        whole |= set(_ids(next(it)))
    assert len(whole) == 16


@pytest.mark.parametrize("consumed", [3, 4, 6])  # mid-epoch, on the boundary, in the second epoch
def test_exact_resume_in_a_fresh_iterator(shapes_builder, consumed):
    it = _iterator(shapes_builder, seed=2, num_frames=6, image_frames=None)
    for _ in range(consumed):
        next(it)
    state = it.state()
    assert state["epoch"] * 4 + state["batch"] == consumed
    continued = [next(it) for _ in range(3)]
    resumed = _iterator(shapes_builder, seed=2, num_frames=6, state=dict(state))
    assert _same(continued, [next(resumed) for _ in range(3)])
    # restore() on a used iterator rewinds it to the same place.
    it.restore(state)
    assert _same(continued, [next(it) for _ in range(3)])


def test_changed_settings_warn_on_restore(shapes_builder, caplog):
    state = _iterator(shapes_builder, seed=2).state()
    with caplog.at_level(logging.WARNING, logger="vldm_jax.data"):
        _iterator(shapes_builder, seed=3, batch_size=2, state=state)
    assert "seed 2 -> 3" in caplog.text and "batch_size 4 -> 2" in caplog.text
    with pytest.raises(UserError, match="not a data iterator state"):
        _iterator(shapes_builder, state={"step": 1})


def test_image_mode_crop_resize_and_tokens(shapes_builder):
    def tokenize(captions):
        return np.array([[len(c), 7] for c in captions])

    it = _iterator(shapes_builder, batch_size=2, image_frames=3, num_frames=6, resolution=(16, 24),
                   tokenize=tokenize, seed=4)
    batch = next(it)
    assert batch["video"].shape == (2, 3, 16, 24, 3) == it.output_shape()
    np.testing.assert_array_equal(batch["image_only_indicator"], np.ones((2, 3), np.float32))
    assert batch["input_ids"].dtype == np.int32
    assert batch["input_ids"][:, 0].tolist() == [len(c) for c in batch["caption"]]
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    # Image frames are distinct frames of one clip (the object moves between them).
    frames = batch["video"][0]
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])
    # Frame choices are stateless: the same batch again from a fresh iterator.
    again = next(_iterator(shapes_builder, batch_size=2, image_frames=3, num_frames=6, resolution=(16, 24), seed=4))
    np.testing.assert_array_equal(again["video"], batch["video"])


def test_one_ordered_epoch(shapes_builder):
    from vldm_jax.data.pipeline import DataIterator

    it = DataIterator(shapes_builder, batch_size=5, shuffle=False, num_epochs=1, num_processes=1, process_index=0)
    batches = list(it)
    assert len(batches) == 3  # 16 // 5: the partial batch is dropped
    with pytest.raises(StopIteration):
        next(it)


def test_video_folder_source_and_dataset_sources(video_build, tmp_path):
    import tensorflow as tf

    from tests.data.videos import CAPTIONS, TXT_CAPTIONS
    from vldm_jax.data.pipeline import DataIterator, prepare_dataset

    builder, _ = video_build
    it = DataIterator(builder, batch_size=8, num_processes=1, process_index=0)
    batch = next(it)
    assert batch["video"].shape == (8, 4, 16, 16, 3)
    assert sorted(batch["caption"]) == sorted(list(CAPTIONS.values()) + list(TXT_CAPTIONS.values()) + [""] * 4)
    # A prepared dataset folder opens as is; so does a plain tf.data.Dataset of decoded clips.
    from_dir = DataIterator(str(builder.data_dir), batch_size=8, num_processes=1, process_index=0)
    assert _same([batch], [next(from_dir)])
    assert prepare_dataset(str(builder.data_dir), tmp_path).info.splits["train"].num_examples == 8
    clips = np.arange(6 * 2 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 2, 4, 4, 3)
    ds = tf.data.Dataset.from_tensor_slices({"video": clips, "caption": [f"c{i}" for i in range(6)]})
    plain = DataIterator(ds, batch_size=3, num_processes=2, process_index=1, shuffle=False)
    out = next(plain)
    assert out["caption"] == ["c1", "c3", "c5"]
    np.testing.assert_allclose(out["video"], clips[1::2] / 127.5 - 1.0, atol=1e-6)


def test_prepare_dataset_moving_shapes_and_errors(tmp_path):
    from vldm_jax.data.pipeline import DataIterator, prepare_dataset

    builder = prepare_dataset("moving_shapes:4", tmp_path, num_frames=2, resolution=16)
    assert builder.info.splits["train"].num_examples == 4
    with pytest.raises(UserError, match="fewer than the batch size"):
        DataIterator(builder, batch_size=3, num_processes=2, process_index=0)
    with pytest.raises(ConfigError, match="num_frames"):
        DataIterator(builder, batch_size=1, num_frames=3, num_processes=1, process_index=0)
    with pytest.raises(ConfigError, match="process_index"):
        DataIterator(builder, batch_size=1, num_processes=2, process_index=2)
    with pytest.raises(UserError, match="moving_shapes:N"):
        prepare_dataset("moving_shapes:many", tmp_path)
    with pytest.raises(UserError, match="not found"):
        prepare_dataset(tmp_path / "nothing", tmp_path)
