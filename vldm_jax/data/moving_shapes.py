"""Moving shapes: a procedural captioned video dataset that needs no download.

Each clip shows one coloured shape (circle, square, triangle) gliding in a straight line
(left, right, up, down) at one of two speeds over a black background, captioned like
``"a red circle moving right"``. The object stays fully inside the frame for the whole clip,
its edges are anti-aliased (coverage from a signed distance), and its true centre in every
frame is returned, so an evaluation can judge a generated clip against the caption.

Two ways in:

- ``render_clip(...)`` and ``example(...)`` are plain numpy; they never import TensorFlow.
- ``MovingShapes`` is a TFDS ``GeneratorBasedBuilder`` (created on first access, which imports
  TF); ``moving_shapes_builder`` / ``prepare_moving_shapes`` make and build one offline.
  Example ``i`` depends only on ``(seed, i)``: the same seed gives the same dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import NamedTuple

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit steps in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Fraction of the free track (frame minus the object) that the object covers over the clip.
# Tying speed to the track, not to pixels per frame, keeps every clip length in frame.
SPEEDS: dict[str, float] = {"slow": 0.35, "fast": 0.85}
SPEED_WORDS: dict[str, str] = {"slow": "slowly", "fast": "quickly"}

# Shape sizes as multiples of the base radius r, chosen so the three shapes have about equal area.
_SQUARE_HALF_SIDE = 0.886  # (2a)^2 = pi r^2
_TRIANGLE_CIRCUMRADIUS = 1.4


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """How the renderer draws a clip (issue 22). The defaults are the original renderer, bit for bit.

    ``radius``: ranges of the base radius as a fraction of the shorter side, drawn from uniformly (several ranges:
    one picked with probability proportional to its width). ``across``: ranges of the position across the motion,
    as a fraction of the free space (0: one edge, 1: the other). ``speed_ranges``: per speed word, the fraction of
    the free track covered over the clip as a range (None: the fixed :data:`SPEEDS`). ``outline``: probability of
    drawing only the outline (``line_width`` px). ``noise``: the largest std of Gaussian background noise in 0-255
    units (drawn uniformly per clip from [0, noise]; 0: none).
    """

    radius: tuple[tuple[float, float], ...] = ((0.09, 0.13),)
    across: tuple[tuple[float, float], ...] = ((0.0, 1.0),)
    speed_ranges: dict | None = None
    outline: float = 0.0
    line_width: float = 2.0
    noise: float = 0.0

    @property
    def is_default(self) -> bool:
        return self == RenderSettings()


# Sizes 8-24 px (diameter of the base circle) at 64x64: radius fraction 0.0625-0.1875. The held-out setting draws
# the sizes and across-positions that the ``varied`` setting never draws (the middle bands), so a model trained on
# ``varied`` meets them first at evaluation.
_HELD_OUT_RADIUS = (0.105, 0.135)
_HELD_OUT_ACROSS = (0.4, 0.6)
RENDER_SETTINGS: dict[str, RenderSettings] = {
    "default": RenderSettings(),
    "varied": RenderSettings(radius=((0.0625, _HELD_OUT_RADIUS[0]), (_HELD_OUT_RADIUS[1], 0.1875)),
                             across=((0.0, _HELD_OUT_ACROSS[0]), (_HELD_OUT_ACROSS[1], 1.0)),
                             speed_ranges={"slow": (0.25, 0.5), "fast": (0.65, 0.95)},
                             outline=0.3, noise=8.0),
    "held_out": RenderSettings(radius=(_HELD_OUT_RADIUS,), across=(_HELD_OUT_ACROSS,),
                               speed_ranges={"slow": (0.25, 0.5), "fast": (0.65, 0.95)},
                               outline=0.3, noise=8.0),
}


def render_settings(setting: "str | RenderSettings | None") -> RenderSettings:
    """A :class:`RenderSettings` from a name of :data:`RENDER_SETTINGS` (``None``: the default)."""
    if setting is None:
        return RENDER_SETTINGS["default"]
    if isinstance(setting, RenderSettings):
        return setting
    if setting not in RENDER_SETTINGS:
        from vldm_jax.errors import UserError

        raise UserError(f"unknown moving-shapes renderer setting {setting!r}; choose one of "
                        f"{', '.join(RENDER_SETTINGS)}")
    return RENDER_SETTINGS[setting]


def _draw_range(rng: np.random.Generator, ranges) -> float:
    """A uniform draw from a union of ranges. One range: exactly ``rng.uniform(lo, hi)`` (the original draw)."""
    if len(ranges) == 1:
        return float(rng.uniform(*ranges[0]))
    widths = np.asarray([hi - lo for lo, hi in ranges], np.float64)
    u = float(rng.uniform(0.0, widths.sum()))
    for (lo, hi), w in zip(ranges, widths):
        if u <= w:
            return lo + u
        u -= w
    return float(ranges[-1][1])


class ShapeClip(NamedTuple):
    """One rendered clip.

    frames:  uint8 ``(F, H, W, 3)``.
    centers: float32 ``(F, 2)``, the object's centre ``(x, y)`` in pixels per frame; the frame spans
             ``[0, W] x [0, H]`` and pixel ``(row i, col j)`` has its centre at ``(j + 0.5, i + 0.5)``.
    extent:  float, the radius of a circle around the centre that contains the whole object.
    """

    frames: np.ndarray
    centers: np.ndarray
    extent: float


def caption_for(color: str, shape: str, direction: str, speed: str | None = None) -> str:
    """``"a red circle moving right"``, with ``" slowly"`` / ``" quickly"`` appended when speed is given."""
    text = f"a {color} {shape} moving {direction}"
    return f"{text} {SPEED_WORDS[speed]}" if speed else text


def _check(color, shape, direction, speed):
    for value, table, what in ((color, COLORS, "colour"), (shape, SHAPES, "shape"),
                               (direction, DIRECTIONS, "direction"), (speed, SPEEDS, "speed")):
        if value not in table:
            from vldm_jax.errors import UserError

            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(table)}")


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) from points relative to the shape's centre."""
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        a = _SQUARE_HALF_SIDE * r
        dx, dy = np.abs(px) - a, np.abs(py) - a
        outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
        return outside + np.minimum(np.maximum(dx, dy), 0.0)
    # Equilateral triangle pointing up, centroid at the origin (I. Quilez's exact distance).
    # Work in y-up coordinates; image rows grow downwards.
    half_side = _TRIANGLE_CIRCUMRADIUS * r * np.sqrt(3.0) / 2.0
    k = np.sqrt(3.0)
    x = np.abs(px) - half_side
    y = -py + half_side / k
    fold = x + k * y > 0.0
    x, y = np.where(fold, (x - k * y) / 2.0, x), np.where(fold, (-k * x - y) / 2.0, y)
    x = x - np.clip(x, -2.0 * half_side, 0.0)
    return -np.hypot(x, y) * np.sign(y)


def _extent(shape: str, r: float) -> float:
    return {"circle": r, "square": _SQUARE_HALF_SIDE * np.sqrt(2.0) * r, "triangle": _TRIANGLE_CIRCUMRADIUS * r}[shape]


def render_clip(color: str, shape: str, direction: str, speed: str, num_frames: int = 16,
                size: int | tuple[int, int] = 64, rng: np.random.Generator | None = None,
                setting: str | RenderSettings | None = None) -> ShapeClip:
    """Renders one clip of ``shape`` in ``color`` moving in ``direction`` at ``speed``.

    ``rng`` draws the object's size (default setting: radius 9-13 % of the shorter side), its position across
    the motion and where along its track it starts; ``None`` means ``np.random.default_rng(0)``.
    ``setting``: a :class:`RenderSettings` or a name of :data:`RENDER_SETTINGS` (``"default"``, ``"varied"``,
    ``"held_out"``); the default setting draws exactly the original clips.
    The path keeps the whole object (plus one pixel for the anti-aliased edge) inside the
    frame in every frame. Returns ``ShapeClip(frames (F, H, W, 3) uint8, centers (F, 2), extent)``.
    """
    _check(color, shape, direction, speed)
    opts = render_settings(setting)
    rng = np.random.default_rng(0) if rng is None else rng
    h, w = _hw(size)
    if num_frames < 1 or min(h, w) < 8:
        from vldm_jax.errors import UserError

        raise UserError(f"moving shapes need at least 1 frame and 8x8 pixels, got {num_frames} frames at {h}x{w}")
    r = _draw_range(rng, opts.radius) * min(h, w)
    extent = float(_extent(shape, r))
    margin = extent + 1.0  # one pixel for the anti-aliased edge
    dx, dy = DIRECTIONS[direction]
    along = w if dx else h
    across = h if dx else w
    track = along - 2.0 * margin
    travel = (SPEEDS[speed] if opts.speed_ranges is None else float(rng.uniform(*opts.speed_ranges[speed]))) * track
    start = margin + float(rng.uniform(0.0, track - travel))
    if opts.across == ((0.0, 1.0),):
        offset = float(rng.uniform(margin, across - margin))  # the original draw
    else:
        offset = margin + _draw_range(rng, opts.across) * (across - 2.0 * margin)
    t = np.arange(num_frames, dtype=np.float64) / max(num_frames - 1, 1)
    pos = start + travel * t  # along the motion, in the positive direction
    if dx < 0 or dy < 0:
        pos = along - pos
    xs, ys = (pos, np.full_like(pos, offset)) if dx else (np.full_like(pos, offset), pos)
    centers = np.stack([xs, ys], axis=-1)

    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    sd = _signed_distance(shape, gx[None] - xs[:, None, None], gy[None] - ys[:, None, None], r)
    if opts.is_default:
        coverage = np.clip(0.5 - sd, 0.0, 1.0)
        frames = np.rint(coverage[..., None] * np.asarray(COLORS[color], np.float64)).astype(np.uint8)
        return ShapeClip(frames, centers.astype(np.float32), extent)
    outline = bool(rng.uniform() < opts.outline)
    if outline:  # a band of line_width pixels just inside the edge
        coverage = np.clip(0.5 - np.abs(sd + opts.line_width / 2) + opts.line_width / 2, 0.0, 1.0)
    else:
        coverage = np.clip(0.5 - sd, 0.0, 1.0)
    pixels = coverage[..., None] * np.asarray(COLORS[color], np.float64)
    sigma = float(rng.uniform(0.0, opts.noise)) if opts.noise > 0 else 0.0
    if sigma > 0:
        pixels = pixels + sigma * rng.standard_normal(pixels.shape)
    frames = np.rint(np.clip(pixels, 0.0, 255.0)).astype(np.uint8)
    return ShapeClip(frames, centers.astype(np.float32), extent)


COMBINATIONS: tuple[tuple[str, str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS, SPEEDS))


def example(index: int, *, seed: int = 0, num_frames: int = 16, size: int | tuple[int, int] = 64,
            speed_in_caption: bool = False, setting: str | RenderSettings | None = None) -> dict:
    """Example ``index`` of the dataset with ``seed``, as numpy (no TF).

    Attributes cycle through all colour x shape x direction x speed combinations in a
    seed-dependent order, so any run of ``len(COMBINATIONS)`` consecutive examples is balanced.
    ``setting``: the renderer setting (see :func:`render_clip`).
    Returns ``{"video": (F, H, W, 3) uint8, "caption": str, "color", "shape", "direction",
    "speed": str, "centers": (F, 2) float32, "extent": float32}``.
    """
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(COMBINATIONS))
    color, shape, direction, speed = COMBINATIONS[order[index % len(COMBINATIONS)]]
    clip = render_clip(color, shape, direction, speed, num_frames, size, np.random.default_rng([seed, 1, index]),
                       setting)
    return {
        "video": clip.frames,
        "caption": caption_for(color, shape, direction, speed if speed_in_caption else None),
        "color": color, "shape": shape, "direction": direction, "speed": speed,
        "centers": clip.centers, "extent": np.float32(clip.extent),
    }


def parse_dataset_name(text: str, default_count: int) -> int | None:
    """The example count of a ``"moving_shapes"`` / ``"moving_shapes:N"`` / ``"moving_shapes:N:SETTING"`` dataset
    name (``default_count`` when no N is given); None when ``text`` names something else."""
    text = os.fspath(text)
    if text != "moving_shapes" and not text.startswith("moving_shapes:"):
        return None
    fields = text.split(":")
    if len(fields) == 1 or (len(fields) == 3 and fields[1] == ""):
        count = default_count
    else:
        try:
            count = int(fields[1])
        except ValueError:
            count = None
    if count is None or len(fields) > 3:
        from vldm_jax.errors import UserError

        raise UserError(f"bad dataset {text!r}: write moving_shapes:N or moving_shapes:N:SETTING with N a number "
                        f"of examples and SETTING one of {', '.join(RENDER_SETTINGS)}")
    if len(fields) == 3:
        render_settings(fields[2])  # checks the name
    return count


def parse_dataset_setting(text: str) -> str:
    """The renderer setting of a ``"moving_shapes:N:SETTING"`` dataset name (``"default"`` without one)."""
    fields = os.fspath(text).split(":")
    if fields[0] != "moving_shapes" or len(fields) < 3:
        return "default"
    render_settings(fields[2])
    return fields[2]


def _render_range(args) -> tuple[np.ndarray, list[str]]:
    start, stop, seed, num_frames, size, speed_in_caption, setting = args
    items = [example(i, seed=seed, num_frames=num_frames, size=size, speed_in_caption=speed_in_caption,
                     setting=setting) for i in range(start, stop)]
    return np.stack([e["video"] for e in items]), [e["caption"] for e in items]


def render_arrays(num_examples: int, *, seed: int = 0, num_frames: int = 16, size: int | tuple[int, int] = 64,
                  speed_in_caption: bool = False, workers: int | None = None,
                  setting: str | None = None) -> dict[str, np.ndarray]:
    """The first ``num_examples`` examples of the dataset with ``seed``, rendered into memory with numpy
    (the same clips as the TFDS build of those options): ``{"video": (N, F, H, W, 3) uint8, "caption": (N,) str}``.

    ``workers`` processes render in parallel (default: the CPU count, at most 16; 1 renders here). They are
    spawned, not forked, so a caller that already holds an accelerator is safe.
    """
    if num_examples < 1:
        from vldm_jax.errors import UserError

        raise UserError(f"moving shapes need at least 1 example (got {num_examples})")
    h, w = _hw(size)
    workers = min(os.cpu_count() or 1, 16) if workers is None else max(1, int(workers))
    chunk = max(1, min(512, -(-num_examples // (4 * workers))))
    jobs = [(i, min(i + chunk, num_examples), seed, num_frames, (h, w), speed_in_caption, setting)
            for i in range(0, num_examples, chunk)]
    if workers == 1 or len(jobs) == 1:
        parts = [_render_range(j) for j in jobs]
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            parts = list(ex.map(_render_range, jobs))
    video = np.concatenate([p[0] for p in parts])
    captions = np.array([c for p in parts for c in p[1]])
    return {"video": video, "caption": captions}


# ---------------------------------------------------------------- TFDS builder (imports TF lazily)

@functools.cache
def _builder_classes():
    from vldm_jax.data._tf import tfds

    @dataclasses.dataclass(eq=False)
    class MovingShapesConfig(tfds.core.BuilderConfig):
        """Options of a moving-shapes build; the config name encodes them, so builds never collide."""

        num_examples: int = 1024
        validation_examples: int = 0
        num_frames: int = 16
        height: int = 64
        width: int = 64
        seed: int = 0
        speed_in_caption: bool = False
        setting: str = "default"

    class MovingShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Moving shapes: ``train`` (and ``validation`` when asked) splits of captioned clips."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release."}

        def _info(self):
            c = self.builder_config
            f = tfds.features
            return self.dataset_info_from_configs(
                description=__doc__.split("\n\n")[1],
                features=f.FeaturesDict({
                    "video": f.Video(shape=(c.num_frames, c.height, c.width, 3)),
                    "caption": f.Text(),
                    "color": f.ClassLabel(names=list(COLORS)),
                    "shape": f.ClassLabel(names=list(SHAPES)),
                    "direction": f.ClassLabel(names=list(DIRECTIONS)),
                    "speed": f.ClassLabel(names=list(SPEEDS)),
                    "centers": f.Tensor(shape=(c.num_frames, 2), dtype=np.float32),
                    "extent": f.Scalar(dtype=np.float32),
                }),
            )

        def _split_generators(self, dl_manager):
            c = self.builder_config
            splits = {"train": self._generate_examples(c.seed, c.num_examples)}
            if c.validation_examples:
                # A different seed stream, so validation clips are never training clips.
                splits["validation"] = self._generate_examples(c.seed + 1_000_003, c.validation_examples)
            return splits

        def _generate_examples(self, seed, n):
            c = self.builder_config
            for i in range(n):
                yield i, example(i, seed=seed, num_frames=c.num_frames, size=(c.height, c.width),
                                 speed_in_caption=c.speed_in_caption, setting=c.setting)

    return MovingShapesConfig, MovingShapes


def __getattr__(name):
    if name in ("MovingShapes", "MovingShapesConfig"):
        config_cls, builder_cls = _builder_classes()
        return {"MovingShapesConfig": config_cls, "MovingShapes": builder_cls}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def moving_shapes_builder(data_dir: str | os.PathLike, *, num_examples: int = 1024, num_frames: int = 16,
                          size: int | tuple[int, int] = 64, seed: int = 0, speed_in_caption: bool = False,
                          validation_examples: int = 0, setting: str = "default"):
    """A ``MovingShapes`` TFDS builder writing under ``data_dir`` (not yet prepared); ``setting``: a renderer
    setting name of :data:`RENDER_SETTINGS`."""
    config_cls, builder_cls = _builder_classes()
    render_settings(setting)
    h, w = _hw(size)
    name = (f"n{num_examples}_v{validation_examples}_f{num_frames}_{h}x{w}_seed{seed}"
            + ("_speed" if speed_in_caption else "") + ("" if setting == "default" else f"_{setting}"))
    config = config_cls(name=name, num_examples=num_examples, validation_examples=validation_examples,
                        num_frames=num_frames, height=h, width=w, seed=seed, speed_in_caption=speed_in_caption,
                        setting=setting)
    return builder_cls(config=config, data_dir=os.fspath(data_dir))


def prepare_moving_shapes(data_dir: str | os.PathLike, **options):
    """Builds the dataset offline under ``data_dir`` (a no-op when already built) and returns the builder.

    ``options`` are those of ``moving_shapes_builder``.
    """
    from vldm_jax.data._tf import download_and_prepare

    builder = moving_shapes_builder(data_dir, **options)
    download_and_prepare(builder)
    return builder
