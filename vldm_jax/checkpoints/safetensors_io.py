"""``.safetensors`` files read and written without the safetensors package: zero-copy memory-mapped reads (any
dtype, bfloat16 included), writes laid out for zero-copy loading."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from vldm_jax.errors import CheckpointError

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


ALIGN = 64


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes a standard ``.safetensors`` file laid out for zero-copy loading: the data section starts
    64-byte aligned and tensors go largest first, so every tensor whose size is a multiple of 64 bytes
    (all large ones) stays aligned. Not atomic by itself: callers write inside a temporary folder."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    order = sorted(arrays, key=lambda k: (-np.asarray(arrays[k]).nbytes, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        a = np.asarray(arrays[k])
        if a.dtype not in names:
            raise CheckpointError(f"cannot store {k}: dtype {a.dtype} has no safetensors name")
        header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # the format allows trailing spaces in the header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            f.write(np.ascontiguousarray(arrays[k]).tobytes(order="C"))


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file: {what}")


def _tensor_layout(path: Path, key: str, info: Any, data_size: int) -> tuple[Any, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, every field checked against the data section's real
    size before anything is mapped (a header may claim any size; nothing is allocated for a claim)."""
    if not isinstance(info, dict):
        raise _bad(path, f"entry {key!r} is not an object")
    dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _bad(path, f"tensor {key!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _bad(path, f"tensor {key!r} has bad data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise _bad(path, f"tensor {key!r} lies outside the file (bytes {start}..{end} of {data_size})")
    nbytes = int(np.dtype(dtype).itemsize) * math.prod(shape)  # Python ints: no overflow
    if nbytes != end - start:
        raise CheckpointError(f"{path}: tensor {key!r} has inconsistent size ({shape} {info['dtype']} is {nbytes} "
                              f"bytes, its offsets span {end - start})")
    return dtype, tuple(shape), start, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file as numpy views of a private memory map (no copy, any dtype incl. bf16).

    The header is checked as the reference reader checks it before any tensor is touched: JSON object of
    entries with a known dtype, a shape and offsets that lie inside the file, sizes that agree, and offsets that
    tile the data section without holes or overlaps. Anything else is a CheckpointError naming the file."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot open weights file {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or n > size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
        except _DuplicateKey as e:
            raise _bad(path, f"duplicate key {e.args[0]!r} in the header") from None
        if not isinstance(header, dict):
            raise _bad(path, "the header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise _bad(path, "__metadata__ is not a mapping of strings")
        data_size = size - 8 - n
        layout = {key: _tensor_layout(path, key, info, data_size) for key, info in header.items()}
        spans = sorted((start, end, key) for key, (_, _, start, end) in layout.items())
        cursor = 0
        for start, end, key in spans:
            if start != cursor:
                raise _bad(path, f"tensor {key!r} starts at byte {start}, expected {cursor} (hole or overlap)")
            cursor = end
        if cursor != data_size:
            raise _bad(path, f"the tensors cover {cursor} of the {data_size} data bytes")
        # Copy-on-write: arrays may alias the mapping zero-copy (JAX on CPU does for 64-byte aligned data),
        # and a private mapping keeps any later in-place write away from the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else b""
    out = {}
    for key, (dtype, shape, start, end) in layout.items():
        count = math.prod(shape)
        if count == 0:  # may sit at the very end of the file, where no buffer offset is valid
            out[key] = np.zeros(shape, dtype)
        else:
            out[key] = np.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start).reshape(shape)
    return out
