"""Reading and writing images and videos (imageio). Writes are atomic: temporary name, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from vldm_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".webp")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 (values outside are clipped)."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...], *, overwrite: bool = False) -> Path:
    """Validates an output path before any work is done: known suffix, existing folder, no clobbering."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{path}: unsupported output format {path.suffix or '(none)'!r}; use one of {', '.join(suffixes)}")
    if not path.parent.exists():
        raise UserError(f"{path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another name or pass --overwrite")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: folder {path.parent} is not writable")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def remove_stale_temporaries(folder: Path, prefix: str) -> None:
    """Removes ``{prefix}{pid}-*`` temporaries left in ``folder`` by writers that were killed (their pid is gone)."""
    for p in folder.glob(f"{prefix}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                import shutil

                shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass


def _atomic(path: Path, write) -> Path:
    prefix = f".{path.stem}.tmp-"
    remove_stale_temporaries(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a vanished folder: one line, nothing half-written left
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Writes one ``(H, W, 3)`` image (float in [0, 1] or uint8)."""
    import imageio.v3 as iio

    path = Path(path)
    return _atomic(path, lambda tmp: iio.imwrite(tmp, to_uint8(image), extension=path.suffix))


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Writes ``(F, H, W, 3)`` frames as GIF (looping), MP4/WebM (ffmpeg) or animated WebP."""
    import imageio.v3 as iio

    path = Path(path)
    frames = to_uint8(frames)
    suffix = path.suffix.lower()

    def write(tmp):
        if suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000.0 / fps, loop=0)
        elif suffix in (".mp4", ".webm"):
            _write_ffmpeg(tmp, frames, fps, codec="libx264" if suffix == ".mp4" else "libvpx-vp9")
        else:
            iio.imwrite(tmp, frames, extension=suffix, duration=1000.0 / fps, loop=0)

    return _atomic(path, write)


def _write_ffmpeg(tmp: str, frames: np.ndarray, fps: float, codec: str) -> None:
    import imageio.v2 as iio2

    # yuv420p needs even sizes; macro_block_size=1 keeps odd test sizes legal (with a quality cost).
    with iio2.get_writer(tmp, format="FFMPEG", fps=fps, codec=codec, macro_block_size=1,
                         pixelformat="yuv420p" if frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0 else None) as w:
        for f in frames:
            w.append_data(f)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as uint8 ``(H, W, 3)`` (alpha dropped, grey expanded)."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        img = np.asarray(iio.imread(path))
    except Exception as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Reads a video as uint8 ``(F, H, W, 3)`` and its frame rate."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise UserError(f"video not found: {path}")
    try:
        frames = np.asarray(iio.imread(path, index=None))
        meta = iio.immeta(path)
    except Exception as e:
        raise UserError(f"cannot read video {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    fps = float(meta.get("fps") or (1000.0 / meta["duration"] if meta.get("duration") else 8.0))
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    return frames[..., :3].astype(np.uint8), fps
