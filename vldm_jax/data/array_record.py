"""A WebVid-style list of captioned videos written once into sharded ``array_record`` files (``vldm prepare``).

The source is a CSV or JSONL file (local or ``gs://``, read through ``etils.epath``) with one clip per row:
``path, caption[, start, end]`` (``start``/``end`` in seconds; ``path`` relative to the list's folder or
absolute, local or ``gs://``). A CSV may have a header naming its columns (``path``/``file``/``video``,
``caption``/``text``/``name``, ``start``, ``end``); without one the columns are taken in that order. Each row
becomes one example: ``num_frames`` frames from ``start`` (every ``frame_stride`` source frames, or at ``fps``),
resized to cover ``(height, width)`` and centre-cropped, stored decoded (uint8), so training reads them without
decoding video (and without TensorFlow: :mod:`vldm_jax.data.grain_pipeline`).

The output folder::

    OUT/
      spec.json                          what the folder holds: {"format": "vldm_array_record", shapes, shards,
                                         num_examples, skipped: [{"file", "reason"}], num_skipped, ...}
      train-00000-of-00004.array_record  one record per clip (see encode_record), round-robin over the shards

A video that cannot be read, or is too short for ``num_frames`` frames before ``end``, is skipped, counted and
listed in ``spec.json``; it is never fatal unless no clip at all is left. A local output is written into a
temporary folder renamed into place when complete (an existing one is refused unless ``overwrite``); a
``gs://`` output is written locally first, copied, and its ``spec.json`` (what marks it complete) goes last.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from vldm_jax.errors import UserError
from vldm_jax.io.files import replace_folder

log = logging.getLogger("vldm_jax.data")

SPEC_FILE = "spec.json"
FORMAT = "vldm_array_record"
FORMAT_VERSION = 1
_MAGIC = b"VLDMREC1"

_COLUMN_ALIASES = {"path": "path", "file": "path", "video": "path", "filename": "path", "caption": "caption",
                   "text": "caption", "name": "caption", "start": "start", "end": "end"}


# ------------------------------------------------------------------------------------------ record format

def encode_record(example: dict[str, Any]) -> bytes:
    """``{name: str | ndarray}`` -> bytes: magic, a little-endian u32 header length, a JSON header (texts, and
    name/dtype/shape of each array), then the arrays' raw C-order bytes in header order. No pickle."""
    texts = {k: v for k, v in example.items() if isinstance(v, str)}
    arrays = [(k, np.asarray(v)) for k, v in example.items() if not isinstance(v, str)]
    header = json.dumps({"texts": texts, "arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays]}).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header] + [a.tobytes(order="C") for _, a in arrays])


def decode_record(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`encode_record` (arrays are read-only views of ``data``)."""
    if data[:len(_MAGIC)] != _MAGIC:
        raise UserError("not a vldm_jax array_record example (bad magic); was the folder written by vldm prepare?")
    at = len(_MAGIC)
    (n,) = struct.unpack_from("<I", data, at)
    at += 4
    header = json.loads(data[at:at + n])
    at += n
    out: dict[str, Any] = dict(header["texts"])
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(data, dt, count, at).reshape(tuple(shape))
        at += count * dt.itemsize
    return out


# ------------------------------------------------------------------------------------------------- spec

def _epath(path):
    from etils import epath

    return epath.Path(path)


def is_prepared(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder written by :func:`prepare_array_record` (it holds ``spec.json`` of our format)."""
    if not path:
        return False
    try:
        spec_path = _epath(path) / SPEC_FILE
        if not spec_path.is_file():
            return False
        return json.loads(spec_path.read_text()).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not a folder, unreadable, not JSON: not ours
        return False


def read_spec(folder: str | os.PathLike) -> dict:
    """``spec.json`` of a prepared folder; UserError when it is missing or of another format/version."""
    spec_path = _epath(folder) / SPEC_FILE
    if not spec_path.is_file():
        raise UserError(f"{folder} is not a prepared array_record folder (no {SPEC_FILE}); run vldm prepare")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{spec_path}: not valid JSON ({e})") from None
    if spec.get("format") != FORMAT:
        raise UserError(f"{spec_path}: format {spec.get('format')!r} is not {FORMAT!r}")
    if int(spec.get("version", 0)) > FORMAT_VERSION:
        raise UserError(f"{spec_path}: version {spec.get('version')} is newer than this vldm_jax reads "
                        f"({FORMAT_VERSION})")
    return spec


def shard_paths(folder: str | os.PathLike, spec: dict) -> list[str]:
    return [os.fspath(_epath(folder) / name) for name in spec["shards"]]


# ---------------------------------------------------------------------------------------------- sources

def _number(text, where: str) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number of seconds") from None


def read_source_list(source: str | os.PathLike) -> list[dict]:
    """Rows ``{"path", "caption", "start", "end", "line"}`` of a CSV or JSONL (``.jsonl``/``.json``) list;
    relative paths are resolved against the list's folder. UserError for a missing file or malformed row."""
    src = _epath(source)
    if not src.is_file():
        raise UserError(f"video list not found: {source}")
    base = src.parent
    text = src.read_text(encoding="utf-8")
    rows: list[dict] = []
    if src.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{source}:{n}: not a JSON object ({e.msg})") from None
            if isinstance(obj, dict):
                obj = {_COLUMN_ALIASES.get(str(k).lower(), k): v for k, v in obj.items()}
            if not isinstance(obj, dict) or not obj.get("path"):
                raise UserError(f"{source}:{n}: needs a \"path\" (and \"caption\")")
            rows.append({"path": str(obj["path"]), "caption": str(obj.get("caption") or ""),
                         "start": _number(obj.get("start"), f"{source}:{n}"),
                         "end": _number(obj.get("end"), f"{source}:{n}"), "line": n})
    else:
        table = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        columns = ["path", "caption", "start", "end"]
        first = 1
        if table and all(c.strip().lower() in _COLUMN_ALIASES for c in table[0]):
            columns = [_COLUMN_ALIASES[c.strip().lower()] for c in table[0]]
            table = table[1:]
            first = 2
            if "path" not in columns:
                raise UserError(f"{source}: the header names no path column (path, file or video)")
        for n, row in enumerate(table, first):
            if len(row) > len(columns):
                if columns[-1] == "caption":  # an unquoted comma in the caption, the last column
                    row = row[:len(columns) - 1] + [",".join(row[len(columns) - 1:])]
                else:
                    raise UserError(f"{source}: row {n} has {len(row)} columns, the header {len(columns)}")
            obj = dict(zip(columns, (c.strip() for c in row)))
            if not obj.get("path"):
                raise UserError(f"{source}: row {n} has no video path")
            rows.append({"path": obj["path"], "caption": obj.get("caption") or "",
                         "start": _number(obj.get("start"), f"{source}: row {n}"),
                         "end": _number(obj.get("end"), f"{source}: row {n}"), "line": n})
    for row in rows:
        if "://" not in row["path"] and not os.path.isabs(row["path"]):
            row["path"] = os.fspath(base / row["path"])
    if not rows:
        raise UserError(f"{source} lists no video")
    return rows


class _Skip(Exception):
    pass


def read_clip(path: str, *, num_frames: int, height: int, width: int, start: float | None = None,
              end: float | None = None, frame_stride: int = 1, fps: float | None = None) -> tuple[np.ndarray, float]:
    """``(num_frames, height, width, 3)`` uint8 frames of ``path`` from ``start`` seconds, every ``frame_stride``
    source frames (or at ``fps``), and the clip's frame rate. Streams the video (never holds all of it); a
    ``gs://`` video is copied to a temporary local file first. Raises ``_Skip(reason)`` when unusable."""
    import imageio.v3 as iio

    from vldm_jax.data.frames import fps_from_meta, resize_center_crop, rgb

    suffix = Path(path).suffix.lower()
    tmp = None
    try:
        if "://" in path:
            p = _epath(path)
            if not p.exists():
                raise _Skip("file not found")
            fd, tmp = tempfile.mkstemp(suffix=suffix)
            with os.fdopen(fd, "wb") as fh:
                fh.write(p.read_bytes())
            local = tmp
        else:
            if not os.path.isfile(path):
                raise _Skip("file not found")
            local = path
        try:
            with iio.imopen(local, "r") as video:
                rate = fps_from_meta(video.metadata(), suffix)
                stride = max(1, round(rate / fps)) if fps else max(1, int(frame_stride))
                first = int(round((start or 0.0) * rate))
                stop = int(round(end * rate)) if end is not None else None
                frames: list[np.ndarray] = []
                for index, frame in enumerate(video.iter()):
                    if stop is not None and index >= stop:
                        break
                    if index >= first and (index - first) % stride == 0:
                        frames.append(resize_center_crop(rgb(frame), height, width))
                        if len(frames) == num_frames:
                            break
        except _Skip:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"; never fatal
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _Skip(f"cannot read: {message}") from None
        if len(frames) < num_frames:
            where = f" between {start or 0:g}s and {end:g}s" if end is not None else (
                f" after {start:g}s" if start else "")
            raise _Skip(f"too short: {len(frames)} of {num_frames} frames{where} at stride {stride}")
        return np.stack(frames), rate / stride
    finally:
        if tmp is not None:
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------- writing

def _ordered(pool, fn, items, *, ahead: int):
    """``fn(item)`` for each item in order, at most ``ahead`` running or done-but-unread (bounded memory: a
    slow video does not let the others pile up decoded)."""
    import collections

    queue: collections.deque = collections.deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _writer(path: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    # group_size:1: every record is its own chunk, so random access (grain's shuffling) reads one clip.
    return ArrayRecordWriter(path, "group_size:1")


def prepare_array_record(source: str | os.PathLike, out: str | os.PathLike, *, num_frames: int,
                         resolution: int | tuple[int, int], shards: int | None = None, frame_stride: int = 1,
                         fps: float | None = None, workers: int | None = None, overwrite: bool = False,
                         encoder: Callable[[list[dict]], list[dict]] | None = None, encode_batch: int = 8,
                         encoded_info: dict | None = None,
                         echo: Callable[[str], None] | None = None) -> dict:
    """Decodes every clip of the list ``source`` into ``shards`` array_record files under ``out``; returns the
    spec (also written as ``out/spec.json``). ``resolution``: int (square) or ``(height, width)``.

    ``encoder``: optional, called on lists of up to ``encode_batch`` examples (``video`` uint8, ``caption``) and
    returning the extra arrays to store with each (cached ``latents`` / ``encoder_hidden_states``);
    ``encoded_info`` goes into the spec under ``"encoded"``.
    """
    say = echo or (lambda m: log.info("%s", m))
    h, w = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    if num_frames < 1 or h < 1 or w < 1:
        raise UserError(f"--frames and --resolution must be positive (got {num_frames} frames at {h}x{w})")
    if fps is not None and fps <= 0:
        raise UserError(f"--fps must be positive, got {fps}")
    rows = read_source_list(source)
    shards = int(shards) if shards else max(1, min(len(rows), -(-len(rows) // 1024)))
    if shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}")
    out_path = _epath(out)
    remote = "://" in os.fspath(out)
    if out_path.exists():
        if not overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it")
    names = [f"train-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
    if remote:
        staging = Path(tempfile.mkdtemp(prefix="vldm_prepare_"))
    else:
        local_out = Path(os.fspath(out)).absolute()
        local_out.parent.mkdir(parents=True, exist_ok=True)
        from vldm_jax.io.video import remove_stale_temporaries

        for kind in ("tmp", "old"):  # what a killed `vldm prepare` left behind (its pid is gone)
            remove_stale_temporaries(local_out.parent, f".{local_out.name}.{kind}-")
        staging = Path(tempfile.mkdtemp(prefix=f".{local_out.name}.tmp-{os.getpid()}-", dir=local_out.parent))
    t0 = time.perf_counter()
    skipped: list[dict] = []
    count = 0
    writers = [_writer(os.fspath(staging / n)) for n in names]
    features: dict[str, dict] = {}
    try:
        def load(row):
            try:
                clip, clip_fps = read_clip(row["path"], num_frames=num_frames, height=h, width=w, start=row["start"],
                                           end=row["end"], frame_stride=frame_stride, fps=fps)
                return row, clip, clip_fps, None
            except _Skip as e:
                return row, None, None, str(e)

        pending: list[dict] = []

        def write(examples: list[dict]) -> None:
            nonlocal count
            if encoder is not None and examples:
                extra = encoder(examples)
                examples = [{**ex, **more} for ex, more in zip(examples, extra)]
            for ex in examples:
                if not features:
                    features.update({k: ({"dtype": "text"} if isinstance(v, str) else
                                         {"dtype": np.asarray(v).dtype.name, "shape": list(np.shape(v))})
                                     for k, v in ex.items()})
                writers[count % shards].write(encode_record(ex))
                count += 1

        n_workers = workers or max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
            for row, clip, clip_fps, reason in _ordered(pool, load, rows, ahead=4 * n_workers):
                if reason is not None:
                    skipped.append({"file": row["path"], "line": row["line"], "reason": reason})
                    continue
                pending.append({"video": clip, "caption": row["caption"], "file": row["path"],
                                "fps": np.float32(clip_fps), "start": np.float32(row["start"] or 0.0)})
                if encoder is None or len(pending) >= encode_batch:
                    write(pending)
                    pending = []
        write(pending)
        for wr in writers:
            wr.close()
        writers = []
        if count == 0:
            names_ = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:5])
            raise UserError(f"no usable clip in {source}: skipped {len(skipped)}: {names_}")
        spec = {"format": FORMAT, "version": FORMAT_VERSION, "source": os.fspath(source), "num_examples": count,
                "num_frames": num_frames, "height": h, "width": w, "frame_stride": frame_stride, "fps": fps,
                "shards": names, "features": features, "encoded": encoded_info,
                "num_skipped": len(skipped), "skipped": skipped}
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        if remote:
            out_path.mkdir(parents=True, exist_ok=True)
            for n in names:
                (out_path / n).write_bytes((staging / n).read_bytes())
            (out_path / SPEC_FILE).write_text((staging / SPEC_FILE).read_text())  # last: marks it complete
            shutil.rmtree(staging)
        else:
            replace_folder(staging, local_out)  # overwrite: the old folder goes only once the new one is complete
    except BaseException:
        for wr in writers:
            try:
                wr.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(staging, ignore_errors=True)
        raise
    took = time.perf_counter() - t0
    say(f"wrote {count} clip(s) of {num_frames}x{h}x{w} in {shards} shard(s) to {out} in {took:.1f}s; "
        f"skipped {len(skipped)} video(s)")
    for s in skipped:
        (echo or (lambda m: log.warning("%s", m)))(f"skipped {s['file']} (line {s['line']}): {s['reason']}")
    return spec


def iter_records(folder: str | os.PathLike) -> Iterable[dict]:
    """Every example of a prepared folder, decoded, in storage order (for inspection and tests)."""
    import grain

    spec = read_spec(folder)
    source = grain.sources.ArrayRecordDataSource(shard_paths(folder, spec))
    for i in range(len(source)):
        yield decode_record(source[i])
