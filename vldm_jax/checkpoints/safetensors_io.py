"""``.safetensors`` files read and written without the safetensors package: zero-copy memory-mapped reads (any
dtype, bfloat16 included), writes laid out for zero-copy loading."""

from __future__ import annotations

import json
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


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file as numpy views of a private memory map (no copy, any dtype incl. bf16)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot open weights file {path}: {e.strerror}") from None
    with f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise CheckpointError(f"{path} is not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
        size = os.fstat(f.fileno()).st_size
        # Copy-on-write: arrays may alias the mapping zero-copy (JAX on CPU does for 64-byte aligned data),
        # and a private mapping keeps any later in-place write away from the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else b""
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start)
        if (end - start) != arr.nbytes:
            raise CheckpointError(f"{path}: tensor {key} has inconsistent size")
        out[key] = arr.reshape(info["shape"])
    return out
