"""Frame helpers shared by the data builders, plain numpy/Pillow (no TensorFlow): RGB uint8 frames, resizing to
cover a target and cropping its centre, a video's frame rate from imageio's metadata."""

from __future__ import annotations

import numpy as np

from vldm_jax.errors import ConfigError


def resize_center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 -> ``(height, width, 3)``: scale so the frame covers the target, crop the centre."""
    from PIL import Image

    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    # Pillow filters over the whole footprint when shrinking, so this is antialiased.
    img = Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.asarray(img)[top:top + height, left:left + width]


def rgb(frame: np.ndarray) -> np.ndarray:
    """Grey, grey+alpha, RGBA or float frames -> ``(h, w, 3)`` uint8."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return frame[..., :3]


def fps_from_meta(meta: dict, suffix: str) -> float:
    """Frames per second from imageio's metadata (ffmpeg reports fps; GIFs a per-frame duration in ms); else 8."""
    if meta.get("fps"):
        return float(meta["fps"])
    if meta.get("duration") and suffix == ".gif":
        return 1000.0 / float(meta["duration"])
    return 8.0


def process_topology(num_processes: int | None, process_index: int | None) -> tuple[int, int]:
    """``(process count, this process's index)``: the given values, else JAX's; checked."""
    if num_processes is None or process_index is None:
        import jax

        num_processes = jax.process_count() if num_processes is None else num_processes
        process_index = jax.process_index() if process_index is None else process_index
    if not 0 <= process_index < num_processes:
        raise ConfigError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    return int(num_processes), int(process_index)
