"""Property tests of the safetensors reader (vldm_jax.checkpoints.load.read_safetensors): any byte string a
user can hand us either reads as arrays that lie inside the file, or ends in a CheckpointError naming the file.
Never another exception, never memory proportional to a size the header merely claims."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.hardening._hyp import examples, outcome
from vldm_jax.checkpoints.safetensors_io import read_safetensors, write_safetensors
from vldm_jax.errors import CheckpointError

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}


def _file(tmp_path_factory, data: bytes):
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    path.write_bytes(data)
    return path


def _pack(header, body: bytes = b"", raw_header: bytes | None = None, n: int | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + body


def _read_checked(path):
    """read_safetensors(path), asserting that it either succeeds within the file or fails as a user error."""
    size = path.stat().st_size
    try:
        arrays = read_safetensors(path)
    except CheckpointError as e:
        assert str(path) in str(e), e
        assert "\n" not in str(e)
        outcome(e, path)
        return None
    outcome()
    assert sum(a.nbytes for a in arrays.values()) <= size
    for a in arrays.values():
        a.sum()  # every byte of every view is readable
    return arrays


arrays_st = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
    max_size=4)


def _make(spec):
    return {k: (np.arange(int(np.prod(shape))) % 2).astype(DTYPES[d]).reshape(shape) for k, (d, shape) in spec.items()}


@examples(40)
@given(arrays_st)
def test_round_trip(tmp_path_factory, spec):
    arrays = _make(spec)
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    write_safetensors(path, arrays, {"a": "b"})
    back = read_safetensors(path)
    assert back.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


@examples(60)
@given(st.binary(max_size=200))
@example(b"")
@example(struct.pack("<Q", 2**64 - 1))
@example(struct.pack("<Q", 10**9) + b"{}")
@example(_pack(None, raw_header=b"[]"))
@example(_pack(None, raw_header=b"\xff\xfe"))
@example(_pack(None, raw_header=b"[" * 100000))
def test_any_bytes(tmp_path_factory, data):
    _read_checked(_file(tmp_path_factory, data))


@examples(80)
@given(arrays_st, st.data())
def test_truncated(tmp_path_factory, spec, data):
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    write_safetensors(path, _make(spec))
    blob = path.read_bytes()
    cut = data.draw(st.integers(0, max(len(blob) - 1, 0)))
    path.write_bytes(blob[:cut] + data.draw(st.binary(max_size=16)))
    _read_checked(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=8)
entry_st = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPES, "F8_E4M3", "Q4", "", "f32"]) | json_values,
    "shape": st.lists(st.integers(-3, 2**62), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-8, 2**63), min_size=0, max_size=3) | json_values,
}) | json_values


@examples(120)
@given(st.dictionaries(st.text(max_size=6), entry_st, max_size=4),
       st.one_of(st.none(), json_values), st.binary(max_size=64))
@example({"x": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}, None, b"")
@example({"x": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}, None, b"")
@example({"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, None, b"")
@example({"x": {"dtype": "U8", "shape": [2], "data_offsets": [2, 0]}}, None, b"ab")
@example({"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
          "y": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, None, b"ab")
@example({"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, None, b"ab")
@example({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, None, b"a")
@example({"x": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}, None, b"a")
@example({"x": "F32"}, None, b"")
@example({}, {"k": 1}, b"")
def test_hostile_headers(tmp_path_factory, header, metadata, body):
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    _read_checked(_file(tmp_path_factory, _pack(header, body)))


def test_duplicate_keys_refused(tmp_path):
    raw = b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(_pack(None, b"ab", raw_header=raw))
    with pytest.raises(CheckpointError, match="duplicate"):
        read_safetensors(path)


def test_non_contiguous_offsets_refused(tmp_path):
    path = tmp_path / "hole.safetensors"
    path.write_bytes(_pack({"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"ab"))
    with pytest.raises(CheckpointError, match="hole or overlap"):
        read_safetensors(path)


RSS_PROBE = r"""
import json, resource, struct, sys
from vldm_jax.checkpoints.safetensors_io import read_safetensors  # the reader alone: no jax, ~35 MB of imports
from vldm_jax.errors import CheckpointError
path = sys.argv[1]
header = json.dumps({"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}).encode()
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + b"\0" * 64)
def hwm_kb():  # this process's own peak RSS (getrusage's ru_maxrss also counts the parent's at spawn)
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
before = hwm_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_safetensors(path)
    print("LOADED")
except CheckpointError as e:
    print("REFUSED", e)
print("RSS_KB", *before, hwm_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_terabyte_header_refused_without_allocating(tmp_path):
    # A header that claims a 1 TB float32 tensor over a 64-byte body: refused from the header alone.
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "tb.safetensors")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "tb.safetensors" in lines[0], out.stdout
    hwm0, ru0, hwm1, ru1 = map(int, lines[-1].split()[1:])
    print(f"peak RSS {hwm1 / 1024:.0f} MB (VmHWM; {hwm0 / 1024:.0f} MB after the imports, before the read; "
          f"getrusage ru_maxrss {ru0 / 1024:.0f} -> {ru1 / 1024:.0f} MB)")
    # The read itself adds nothing (a 1 TB allocation would be fatal), and the whole process stays under 200 MB.
    assert hwm1 - hwm0 < 10 * 1024 and ru1 - ru0 < 10 * 1024
    assert hwm1 < 200 * 1024
