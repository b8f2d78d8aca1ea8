"""A local folder of videos as a TFDS dataset of fixed-size captioned clips.

The folder (searched recursively; hidden files ignored) holds ``.mp4 .webm .gif .avi .mov .mkv``
files. Captions come from ``captions.csv`` in the folder (columns ``file,caption``; ``file`` is
the path relative to the folder, or a bare file name) or else from a ``.txt`` beside the video
with the same stem; a video with neither gets the empty caption.

Each video is read frame by frame (imageio; nothing holds a whole long video in memory) and cut
into non-overlapping clips of ``num_frames`` frames taken every ``frame_stride`` source frames
(or at ``fps``, which sets the stride from the video's own frame rate). Frames are resized so
the shorter side covers the target and centre-cropped to ``(height, width)``.

A video that cannot be read, or is too short for one clip, is skipped: a warning names it and
``builder.skipped`` lists ``{"file", "reason"}`` (also after reloading a finished build, since
the list is kept in the dataset's metadata). It is never fatal, unless no clip is left at all.

The build lives in ``data_dir/video_folder/<config>/1.0.0``; the config name encodes the clip
options and a fingerprint of the folder (names, sizes, modification times, captions), so a
changed folder or option makes a fresh build instead of reusing a stale one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from vldm_jax.data import default_data_dir  # noqa: F401 - re-exported
from vldm_jax.data._tf import download_and_prepare, tfds
from vldm_jax.data.frames import fps_from_meta as _fps_from_meta
from vldm_jax.data.frames import resize_center_crop  # noqa: F401 - re-exported
from vldm_jax.data.frames import rgb as _rgb
from vldm_jax.errors import UserError

log = logging.getLogger("vldm_jax.data")

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".avi", ".mov", ".mkv")
CAPTIONS_FILE = "captions.csv"


def list_videos(source_dir: str | os.PathLike) -> list[Path]:
    """Video files under ``source_dir``, sorted by relative path; hidden files and folders ignored."""
    root = Path(source_dir)
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_captions(source_dir: str | os.PathLike, videos: list[Path]) -> dict[str, str]:
    """Caption per video, keyed by relative posix path: ``captions.csv`` first, then ``<stem>.txt``, else ``""``."""
    root = Path(source_dir)
    table: dict[str, str] = {}
    csv_path = root / CAPTIONS_FILE
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "caption"]:
            rows = rows[1:]
        for row in rows:
            if len(row) < 2:
                raise UserError(f"{csv_path}: row {row!r} needs two columns, file and caption")
            table[row[0].strip().replace("\\", "/")] = ",".join(row[1:]).strip()
    captions = {}
    for video in videos:
        rel = video.relative_to(root).as_posix()
        if rel in table:
            captions[rel] = table[rel]
        elif video.name in table:
            captions[rel] = table[video.name]
        elif video.with_suffix(".txt").is_file():
            captions[rel] = video.with_suffix(".txt").read_text(encoding="utf-8").strip()
        else:
            captions[rel] = ""
    return captions


def _fingerprint(root: Path, videos: list[Path]) -> str:
    h = hashlib.sha1()
    extra = [root / CAPTIONS_FILE] + [v.with_suffix(".txt") for v in videos]
    for path in videos + extra:
        if path.is_file():
            st = path.stat()
            h.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def clip_stride(fps: float, *, frame_stride: int = 1, target_fps: float | None = None) -> int:
    """Source frames between clip frames: from ``target_fps`` when given, else ``frame_stride``."""
    if target_fps:
        return max(1, round(fps / target_fps))
    return max(1, int(frame_stride))


def iter_clips(path: str | os.PathLike, *, num_frames: int, height: int, width: int, frame_stride: int = 1,
               target_fps: float | None = None, max_clips: int | None = None):
    """Yields ``(start_frame, clip, clip_fps)``, clip uint8 ``(num_frames, height, width, 3)``.

    Clips are the non-overlapping windows of ``(num_frames - 1) * stride + 1`` source frames,
    keeping every ``stride``-th frame (stride from ``target_fps`` and the video's frame rate when
    given, else ``frame_stride``). The video is opened once and streamed. GIF frames count as
    stored (a GIF writer that merged repeated frames shortens the clip's real duration).
    """
    import imageio.v3 as iio

    with iio.imopen(path, "r") as video:
        fps = _fps_from_meta(video.metadata(), Path(path).suffix.lower())
        stride = clip_stride(fps, frame_stride=frame_stride, target_fps=target_fps)
        span = (num_frames - 1) * stride + 1
        frames: list[np.ndarray] = []
        start = emitted = 0
        for index, frame in enumerate(video.iter()):
            offset = index - start
            if offset % stride == 0:
                frames.append(resize_center_crop(_rgb(frame), height, width))
            if offset == span - 1:
                yield start, np.stack(frames), fps / stride
                emitted += 1
                if max_clips is not None and emitted >= max_clips:
                    return
                frames, start = [], index + 1


@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
    """Clip options. ``fps`` (target frame rate) wins over ``frame_stride`` when set;
    ``clips_per_video`` None takes every non-overlapping clip; ``encoding`` is how frames are
    stored ("png" lossless, "jpeg" smaller)."""

    num_frames: int = 16
    frame_stride: int = 1
    fps: float | None = None
    height: int = 64
    width: int = 64
    clips_per_video: int | None = None
    encoding: str = "png"


class VideoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Clips of a local video folder. Features: ``video`` uint8 ``(F, H, W, 3)``, ``caption``
    text, ``file`` (relative path), ``start_frame`` int32, ``fps`` float32 (of the clip)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, source_dir: str | os.PathLike, **kwargs):
        self.source_dir = Path(source_dir)
        self._skipped: list[dict] = []
        super().__init__(**kwargs)

    def _info(self):
        c = self.builder_config
        f = tfds.features
        return self.dataset_info_from_configs(
            description=f"Clips of the videos in {self.source_dir}",
            features=f.FeaturesDict({
                "video": f.Video(shape=(c.num_frames, c.height, c.width, 3), encoding_format=c.encoding),
                "caption": f.Text(),
                "file": f.Text(),
                "start_frame": f.Scalar(dtype=np.int32),
                "fps": f.Scalar(dtype=np.float32),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        videos = list_videos(self.source_dir)
        return {"train": self._generate_examples(videos, read_captions(self.source_dir, videos))}

    def _skip(self, rel: str, reason: str) -> None:
        log.warning("skipping video %s: %s", rel, reason)
        self._skipped.append({"file": rel, "reason": reason})

    def _generate_examples(self, videos, captions):
        c = self.builder_config
        self._skipped = []
        for video in videos:
            rel = video.relative_to(self.source_dir).as_posix()
            emitted = 0
            try:
                for start, clip, fps in iter_clips(video, num_frames=c.num_frames, height=c.height, width=c.width,
                                                   frame_stride=c.frame_stride, target_fps=c.fps,
                                                   max_clips=c.clips_per_video):
                    yield f"{rel}@{start}", {"video": clip, "caption": captions[rel], "file": rel,
                                             "start_frame": start, "fps": fps}
                    emitted += 1
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"; never fatal
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if emitted:
                    self._skip(rel, f"read error after {emitted} clip(s), kept them: {message}")
                else:
                    self._skip(rel, f"cannot read: {message}")
                continue
            if not emitted:
                timing = f"{c.fps:g} fps" if c.fps else f"stride {c.frame_stride}"
                self._skip(rel, f"too short for one clip of {c.num_frames} frames at {timing}")
        self.info.metadata["skipped"] = list(self._skipped)

    @property
    def skipped(self) -> list[dict]:
        """``[{"file": relative path, "reason": str}]`` for videos left out of (or cut short in) the build."""
        return list(self.info.metadata.get("skipped", self._skipped))


def video_folder_builder(source_dir: str | os.PathLike, data_dir: str | os.PathLike, *, num_frames: int = 16,
                         frame_stride: int = 1, fps: float | None = None, resolution: int | tuple[int, int] = 64,
                         clips_per_video: int | None = None, encoding: str = "png") -> VideoFolder:
    """A ``VideoFolder`` builder for ``source_dir`` writing under ``data_dir`` (not yet prepared).

    ``resolution`` is an int (square) or ``(height, width)``. Raises UserError when the folder
    does not exist or holds no video file.
    """
    root = Path(source_dir).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"video folder not found: {source_dir}")
    videos = list_videos(root)
    if not videos:
        raise UserError(f"no video files ({' '.join(VIDEO_SUFFIXES)}) in {source_dir}")
    if num_frames < 1:
        raise UserError(f"num_frames must be at least 1, got {num_frames}")
    if encoding not in ("png", "jpeg"):
        raise UserError(f"unknown frame encoding {encoding!r}; use png or jpeg")
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    options = dict(num_frames=num_frames, frame_stride=frame_stride, fps=fps, height=int(h), width=int(w),
                   clips_per_video=clips_per_video, encoding=encoding)
    key = hashlib.sha1(json.dumps([str(root), options, _fingerprint(root, videos)]).encode()).hexdigest()[:12]
    timing = f"fps{fps:g}" if fps else f"stride{frame_stride}"
    name = f"f{num_frames}_{timing}_{h}x{w}_{key}"
    config = VideoFolderConfig(name=name, description=f"clips of {root}", **options)
    return VideoFolder(source_dir=root, config=config, data_dir=os.fspath(data_dir))


def prepare_video_folder(source_dir: str | os.PathLike, data_dir: str | os.PathLike, **options) -> VideoFolder:
    """Builds (offline; reuses an existing build) and returns the builder; ``options`` as in
    ``video_folder_builder``. Skipped videos are logged and listed in ``builder.skipped``.
    Raises UserError when no clip at all could be made."""
    builder = video_folder_builder(source_dir, data_dir, **options)
    try:
        download_and_prepare(builder)
    except Exception as e:
        # TFDS refuses to write an empty split; say why it is empty instead.
        if builder._skipped and "No examples were yielded" in str(e):
            names = "; ".join(f"{s['file']} ({s['reason']})" for s in builder._skipped)
            raise UserError(f"no usable clip in {source_dir}: skipped {names}") from None
        raise
    return builder
