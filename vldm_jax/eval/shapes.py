"""The moving-shapes judge: is a generated video the prompted ``"a {color} {shape} moving {direction}"``?

Judged by pixels alone, frame by frame, then over time:

- **object**: the pixels clearly above the black background. Brightness is the max over RGB (so every
  palette colour is bright); the object level ``peak`` is a high percentile of the frame's brighter pixels,
  ``coverage = clip(brightness / peak, 0, 1)`` is the soft (anti-aliased, blur-tolerant) object mask, and the
  largest connected component of ``coverage > 0.5`` (grown by one pixel to keep its soft edge) is the object.
  A frame whose peak is below ``min_peak`` is empty.
- **colour**: the mean colour of the object's interior, divided by its largest channel (a dim or washed-out
  output keeps its hue), nearest of :data:`COLORS` (also divided by their max).
- **shape** from two blur-robust cues of the soft mask (an outlined shape's holes count as covered, so it is
  judged as the shape it outlines). ``fill`` = area / (width x height), with area the
  summed coverage and width/height the summed column/row maxima of coverage (sub-pixel, and unchanged by a
  symmetric blur of a straight edge): circle pi/4 = 0.785, square 1, triangle 0.5. ``asymmetry`` = the
  distance between the area centroid and the centre of the extent, over the extent: 1/6 for the (upward)
  triangle, 0 for the symmetric circle and square. Triangle if asymmetry > 0.05 or fill < 0.64, else circle if
  fill < 0.89, else square; the clip's shape and colour are majority votes over frames.
- **motion**: the coverage-weighted centroid per frame; a least-squares line through the centroids against
  the frame index; the axis of larger displacement and its sign give the direction (``none`` below
  ``min_displacement`` pixels over the clip); ``r2`` is the R² of the linear fit along that axis (1 for a
  steady glide; frames out of order or a jittering object score low); ``straightness`` is the off-axis
  displacement over the on-axis one.
- **flicker**: the larger relative variation (std / mean over frames) of the object's soft area and of its
  brightness level: an object that pops, fades or changes size flickers; the rendered clips score ~0.01.

``ok`` = object in every frame, colour, shape and direction right, ``r2 >= min_r2`` (0.8) and flicker below
``max_flicker``. Measured on rendered clips (tests/eval/test_shapes.py): right on every one of 360 clips
(all 120 colour x shape x direction x speed combinations, three seeds), also after a Gaussian blur of sigma 1
or 1.5 px (a VAE's softening).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from vldm_jax.data.moving_shapes import COLORS, DIRECTIONS, SHAPES
from vldm_jax.errors import UserError

_PALETTE = {name: np.asarray(rgb, np.float64) / max(rgb) for name, rgb in COLORS.items()}


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    min_peak: float = 0.15          # brightness in [0, 1] below which a frame holds no object
    min_area: float = 4.0           # pixels of coverage below which a component is noise
    min_displacement: float = 3.0   # pixels over the clip below which the object does not move
    min_r2: float = 0.8
    max_flicker: float = 0.25
    max_straightness: float = 0.5
    max_seam_jump: float = 2.0      # pixels: a seam's displacement may differ this much from the typical one
    seam_tolerance: float = 0.75    # ... or this fraction of the typical displacement, whichever is larger


@dataclasses.dataclass(frozen=True)
class FrameObject:
    """One frame's object: centroid ``(x, y)`` in pixels (pixel centres at +0.5), soft area in pixels,
    ``fill``, ``asymmetry``, its mean interior colour and brightness ``level``, its colour and shape verdicts, and how many other components the frame has."""

    centroid: tuple[float, float]
    area: float
    fill: float
    asymmetry: float
    mean_color: tuple[float, float, float]
    level: float
    color: str
    shape: str
    extra_components: int


@dataclasses.dataclass(frozen=True)
class ShapeJudgement:
    """The verdict on one video (or image: no motion fields) against the expected attributes (None: not
    asked). ``found`` is the fraction of frames with an object; ``centroids`` ``(F, 2)`` (NaN where none)."""

    num_frames: int
    found: float
    color: str | None
    shape: str | None
    direction: str | None
    r2: float
    straightness: float
    displacement: float
    flicker: float
    centroids: np.ndarray
    expected: dict
    color_ok: bool
    shape_ok: bool
    direction_ok: bool
    motion_ok: bool
    ok: bool
    reason: str
    seam_jump: float = float("nan")
    seams_ok: bool = True

    def row(self) -> dict:
        """A JSON-able dict (no arrays)."""
        d = dataclasses.asdict(self)
        d.pop("centroids")
        return d


# --------------------------------------------------------------------------------------------- prompts

def parse_prompt(prompt: str) -> dict:
    """``"a red circle moving right (slowly)"`` -> ``{"color": "red", "shape": "circle", "direction": "right"}``;
    attributes the prompt does not name are absent."""
    words = re.findall(r"[a-z]+", prompt.lower())
    out = {}
    for key, names in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        found = [w for w in words if w in names]
        if found:
            out[key] = found[0]
    return out


def _expected(prompt, color, shape, direction) -> dict:
    exp = parse_prompt(prompt) if prompt else {}
    for key, value, names in (("color", color, COLORS), ("shape", shape, SHAPES), ("direction", direction, DIRECTIONS)):
        if value is not None:
            if value not in names:
                raise UserError(f"unknown {key} {value!r}; choose one of {', '.join(names)}")
            exp[key] = value
    return exp


# ----------------------------------------------------------------------------------------------- frames

def _as_float_frames(video) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4 or v.shape[-1] != 3:
        raise UserError(f"expected a video (F, H, W, 3) or an image (H, W, 3), got shape {v.shape}")
    if v.dtype == np.uint8:
        return v.astype(np.float64) / 255.0
    v = v.astype(np.float64)
    if not np.all(np.isfinite(v)):
        v = np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(v, 0.0, 1.0)


def classify_shape(fill: float, asymmetry: float) -> str:
    if asymmetry > 0.05 or fill < 0.64:
        return "triangle"
    return "circle" if fill < 0.89 else "square"


def nearest_color(rgb) -> str:
    rgb = np.asarray(rgb, np.float64)
    rgb = rgb / max(float(rgb.max()), 1e-6)
    return min(_PALETTE, key=lambda name: float(np.sum(np.square(rgb - _PALETTE[name]))))


def find_object(frame: np.ndarray, settings: JudgeSettings = JudgeSettings()) -> FrameObject | None:
    """The object in one frame ``(H, W, 3)`` float in [0, 1], or None when the frame is empty."""
    bright = frame.max(axis=-1)
    smooth = ndimage.uniform_filter(bright, size=3, mode="constant")
    top = float(smooth.max())
    if top < settings.min_peak * 0.5:
        return None
    above = bright[bright > 0.5 * max(top, settings.min_peak)]
    peak = float(np.percentile(above, 90)) if above.size else 0.0
    if peak < settings.min_peak:
        return None
    coverage = np.clip(bright / peak, 0.0, 1.0)
    labels, n = ndimage.label(coverage > 0.5)
    if n == 0:
        return None
    sizes = ndimage.sum(coverage, labels, index=np.arange(1, n + 1))
    main = int(np.argmax(sizes)) + 1
    if sizes[main - 1] < settings.min_area:
        return None
    extra = int(np.sum(sizes >= max(settings.min_area, 0.2 * sizes[main - 1]))) - 1
    core = labels == main
    region = ndimage.binary_dilation(core, iterations=1)
    # Other components touching the grown region stay out of it.
    region &= (labels == 0) | (labels == main)
    # An outlined shape is judged as the shape it outlines: the holes of its core count as full coverage (a filled
    # shape has none, so nothing changes for it).
    holes = ndimage.binary_fill_holes(core) & ~core
    cov = np.where(holes, 1.0, np.where(region, coverage, 0.0))
    region |= holes
    area = float(cov.sum())
    h, w = cov.shape
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    row_area, col_area = cov.sum(axis=1), cov.sum(axis=0)
    row_max, col_max = cov.max(axis=1), cov.max(axis=0)
    height, width = float(row_max.sum()), float(col_max.sum())
    cy, cx = float(row_area @ ys / area), float(col_area @ xs / area)
    ey, ex = float(row_max @ ys / height), float(col_max @ xs / width)
    fill = area / max(height * width, 1e-6)
    asymmetry = max(abs(cy - ey) / height, abs(cx - ex) / width)
    interior = region & (coverage > 0.75) & ~holes
    pix = frame[interior] if interior.any() else frame[region]
    mean = pix.mean(axis=0)
    return FrameObject(centroid=(cx, cy), area=area, fill=float(fill), asymmetry=float(asymmetry),
                       mean_color=tuple(float(c) for c in mean), level=peak, color=nearest_color(mean),
                       shape=classify_shape(fill, asymmetry), extra_components=extra)


def _vote(values: Sequence[str]) -> str | None:
    if not values:
        return None
    names, counts = np.unique(np.asarray(values), return_counts=True)
    return str(names[int(np.argmax(counts))])


def _linear_fit(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(slope, r2)`` of the least-squares line through ``(t, y)``."""
    tc = t - t.mean()
    denom = float(tc @ tc)
    if denom == 0:
        return 0.0, 0.0
    slope = float(tc @ (y - y.mean())) / denom
    resid = y - (y.mean() + slope * tc)
    ss_tot = float(np.sum(np.square(y - y.mean())))
    r2 = 1.0 - float(np.sum(np.square(resid))) / ss_tot if ss_tot > 0 else 0.0
    return slope, r2


# ------------------------------------------------------------------------------------------------ judge

def seam_jump(centroids: np.ndarray, seams: Sequence[int], span: int = 1) -> tuple[float, float]:
    """How far the motion jumps at rollout seams: ``(jump, typical)`` in pixels.

    ``centroids`` ``(F, 2)`` (NaN where no object); ``seams``: frame indices where a new window's first frame is;
    ``span``: frames per key-frame step (the interpolation factor when judging an interpolated video). The
    displacement ``c[s] - c[s - span]`` into each seam is compared with the median displacement over ``span``
    frames elsewhere in the clip; ``jump`` is the largest distance between the two, ``typical`` the length of the
    median displacement. NaN when there is no seam or an object is missing around one."""
    c = np.asarray(centroids, np.float64)
    seams = [int(x) for x in seams if span <= int(x) < len(c)]
    if not seams:
        return float("nan"), float("nan")
    steps = c[span:] - c[:-span]  # steps[i] = c[i + span] - c[i]
    at = set(x - span for x in seams)
    others = np.asarray([steps[i] for i in range(len(steps)) if i not in at and np.all(np.isfinite(steps[i]))])
    if len(others) == 0:
        return float("nan"), float("nan")
    typical = np.median(others, axis=0)
    jumps = [float(np.hypot(*(steps[x - span] - typical))) for x in seams]
    if not np.all(np.isfinite(jumps)):
        return float("nan"), float(np.hypot(*typical))
    return max(jumps), float(np.hypot(*typical))


def judge(video, prompt: str | None = None, *, color: str | None = None, shape: str | None = None,
          direction: str | None = None, settings: JudgeSettings = JudgeSettings(),
          seams: Sequence[int] = (), seam_span: int = 1) -> ShapeJudgement:
    """Judges ``video`` ``(F, H, W, 3)`` (uint8, or float in [0, 1]) or an image ``(H, W, 3)`` against a
    ``prompt`` and/or explicit ``color`` / ``shape`` / ``direction`` (explicit values win).

    The motion is judged over the whole track (R² of one line through every frame's centroid). ``seams``: frames
    where a rollout window starts (``seam_span``: see :func:`seam_jump`); the video is then also required to have
    no jump there: the displacement into every seam within ``max(max_seam_jump, seam_tolerance x typical step)``
    pixels of the median displacement, so neither a leap nor a stop (``seam_jump`` and ``seams_ok`` report it).

    An image (or a one-frame video) is judged on colour and shape only; its motion fields are NaN / None.
    """
    frames = _as_float_frames(video)
    exp = _expected(prompt, color, shape, direction)
    f = frames.shape[0]
    objects = [find_object(fr, settings) for fr in frames]
    present = [o is not None for o in objects]
    found = float(np.mean(present)) if f else 0.0
    centroids = np.full((f, 2), np.nan)
    for i, o in enumerate(objects):
        if o is not None:
            centroids[i] = o.centroid
    seen = [o for o in objects if o is not None]
    got_color = _vote([o.color for o in seen])
    got_shape = _vote([o.shape for o in seen])
    got_dir, r2, straight, disp, flick = None, float("nan"), float("nan"), float("nan"), float("nan")
    video_mode = f >= 2
    reasons = []
    if not seen:
        reasons.append("no object found")
    if video_mode and len(seen) >= 2:
        idx = np.flatnonzero(present).astype(np.float64)
        cs = centroids[present]
        sx, r2x = _linear_fit(idx, cs[:, 0])
        sy, r2y = _linear_fit(idx, cs[:, 1])
        span = (f - 1)
        dx, dy = sx * span, sy * span
        horizontal = abs(dx) >= abs(dy)
        along, across = (dx, dy) if horizontal else (dy, dx)
        disp = float(abs(along))
        straight = float(abs(across) / max(abs(along), 1e-6))
        r2 = float(r2x if horizontal else r2y)
        if disp >= settings.min_displacement:
            got_dir = ("right" if dx > 0 else "left") if horizontal else ("down" if dy > 0 else "up")
        else:
            got_dir = "none"
        areas = np.asarray([o.area for o in seen])
        levels = np.asarray([o.level for o in seen])
        flick = float(max(areas.std() / max(areas.mean(), 1e-6), levels.std() / max(levels.mean(), 1e-6)))
    color_ok = "color" not in exp or got_color == exp["color"]
    shape_ok = "shape" not in exp or got_shape == exp["shape"]
    direction_ok = (not video_mode) or "direction" not in exp or got_dir == exp["direction"]
    motion_ok = (not video_mode) or (np.isfinite(r2) and r2 >= settings.min_r2
                                     and straight <= settings.max_straightness
                                     and flick <= settings.max_flicker)
    if seen:
        if found < 1.0:
            reasons.append(f"object missing in {int(round((1 - found) * f))} of {f} frames")
        if not color_ok:
            reasons.append(f"colour {got_color} (expected {exp['color']})")
        if not shape_ok:
            reasons.append(f"shape {got_shape} (expected {exp['shape']})")
        if video_mode:
            if not direction_ok:
                reasons.append(f"direction {got_dir} (expected {exp['direction']})")
            if not (np.isfinite(r2) and r2 >= settings.min_r2):
                reasons.append(f"R² {r2:.2f} < {settings.min_r2}")
            if np.isfinite(straight) and straight > settings.max_straightness:
                reasons.append(f"not straight ({straight:.2f})")
            if np.isfinite(flick) and flick > settings.max_flicker:
                reasons.append(f"flicker {flick:.2f}")
    jump, typical = seam_jump(centroids, seams, seam_span) if seams else (float("nan"), float("nan"))
    seams_ok = True
    if seams:
        seams_ok = bool(np.isfinite(jump) and jump <= max(settings.max_seam_jump, settings.seam_tolerance * typical))
        if seen and not seams_ok:
            reasons.append(f"jump at a seam ({jump:.1f} px, typical step {typical:.1f} px)")
    ok = bool(seen) and found == 1.0 and color_ok and shape_ok and direction_ok and bool(motion_ok) and seams_ok
    return ShapeJudgement(num_frames=f, found=found, color=got_color, shape=got_shape, direction=got_dir,
                          r2=float(r2), straightness=float(straight), displacement=float(disp),
                          flicker=float(flick), centroids=centroids, expected=exp,
                          color_ok=bool(color_ok and seen), shape_ok=bool(shape_ok and seen),
                          direction_ok=bool(direction_ok and seen), motion_ok=bool(motion_ok and seen), ok=ok,
                          reason="; ".join(reasons) if reasons else "ok", seam_jump=float(jump), seams_ok=seams_ok)


def judge_many(videos: Iterable, prompts: Sequence[str | Mapping], *,
               settings: JudgeSettings = JudgeSettings(), seams: Sequence[int] = (), seam_span: int = 1) -> dict:
    """Judges each video against its prompt (a string, or a dict of ``color`` / ``shape`` / ``direction``);
    ``seams`` / ``seam_span``: rollout seams, the same for every video (see :func:`judge`).

    Returns ``{"n", "ok", "color", "shape", "direction", "motion", "r2_mean", "r2_pass", "flicker_mean",
    "found", "direction_confusion": {expected: {got: count}}, "rows": [...]}`` with rates in [0, 1], and with
    seams also ``"seams_ok"`` (rate) and ``"seam_jump_mean"`` (pixels).
    """
    rows, judgements = [], []
    for video, prompt in zip(videos, prompts, strict=True):
        if isinstance(prompt, Mapping):
            j = judge(video, None, settings=settings, seams=seams, seam_span=seam_span, **dict(prompt))
        else:
            j = judge(video, prompt, settings=settings, seams=seams, seam_span=seam_span)
        judgements.append(j)
        row = j.row()
        row["prompt"] = prompt if isinstance(prompt, str) else dict(prompt)
        rows.append(row)
    n = len(judgements)

    def rate(values):
        return float(np.mean(values)) if values else float("nan")

    confusion: dict[str, dict[str, int]] = {}
    for j in judgements:
        if "direction" in j.expected:
            bucket = confusion.setdefault(j.expected["direction"], {})
            bucket[str(j.direction)] = bucket.get(str(j.direction), 0) + 1
    r2s = [j.r2 for j in judgements if np.isfinite(j.r2)]
    flicks = [j.flicker for j in judgements if np.isfinite(j.flicker)]
    extra = {}
    if seams:
        jumps = [j.seam_jump for j in judgements if np.isfinite(j.seam_jump)]
        extra = {"seams_ok": rate([j.seams_ok for j in judgements]), "seam_jump_mean": rate(jumps)}
    return {**extra,
        "n": n,
        "ok": rate([j.ok for j in judgements]),
        "color": rate([j.color_ok for j in judgements]),
        "shape": rate([j.shape_ok for j in judgements]),
        "direction": rate([j.direction_ok for j in judgements]),
        "motion": rate([j.motion_ok for j in judgements]),
        "r2_mean": rate(r2s),
        "r2_pass": rate([np.isfinite(j.r2) and j.r2 >= settings.min_r2 for j in judgements]),
        "flicker_mean": rate(flicks),
        "found": rate([j.found for j in judgements]),
        "direction_confusion": confusion,
        "rows": rows,
    }
