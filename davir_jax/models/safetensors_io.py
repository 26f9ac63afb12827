"""Reading and writing `.safetensors` weight files (no pickle, bf16 included).

Reading goes through the `safetensors` library (`safe_open`, NumPy arrays; bfloat16 comes back
as an `ml_dtypes` array), which validates the header and maps the file, so tensors are read one
at a time. When the library refuses a file, its message names neither the file nor the tensor,
so `_diagnose` reads the JSON header to say which tensor is at fault.

Writing streams: `write_streaming` takes the shapes up front and the arrays one at a time, so an
export of a large model never holds more than one tensor in host memory. The library has no
such writer (`safetensors.serialize_file` needs every tensor's buffer alive at once), so the
format's three parts (8-byte header length, JSON header, raw little-endian bytes) are written
here, and every file is read back through `safe_open` in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from davir_jax.core.io import atomic_file

# What the writer accepts, by the format's dtype codes (the reader takes whatever the library
# reads).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class WeightFileError(ValueError):
    """A weight file is missing, truncated, or disagrees with the model config."""


class SafetensorsFile:
    """The tensors of one `.safetensors` file, read one at a time through `safe_open`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightFileError(f"{self.path}: weight file not found")
        try:
            self._file = safe_open(self.path, framework="numpy")
        except SafetensorError as e:
            raise WeightFileError(f"{self.path}: {_diagnose(self.path, e)}") from e
        self.metadata: dict[str, str] = self._file.metadata() or {}
        # File order (by offset), as the header lists them: errors then name the first tensor a
        # reader of the file meets.
        self._names = list(self._file.offset_keys())
        self._known = set(self._names)

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return tuple(self._file.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        self._check(name)
        try:
            return self._file.get_tensor(name)
        except (SafetensorError, TypeError, ValueError) as e:
            raise WeightFileError(f"{self.path}: tensor {name!r} cannot be read ({e})") from e

    def _check(self, name: str) -> None:
        if name not in self._known:
            raise WeightFileError(f"{self.path}: tensor {name!r} is missing")


def _diagnose(path: Path, err: Exception) -> str:
    """Why `safe_open` refused `path`, naming the first tensor at fault where one is.

    Only explains a refusal; it never decides whether a file is read.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "truncated (no safetensors header)"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"truncated header ({n} bytes announced)"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"corrupt safetensors header: {e}"
    if not isinstance(header, dict):
        return f"corrupt safetensors header: not a JSON object ({err})"
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, e in header.items():
        try:
            _begin, end = (int(x) for x in e["data_offsets"])
            _shape = [int(x) for x in e["shape"]]
            _dtype = e["dtype"]
        except (KeyError, TypeError, ValueError) as bad:
            return f"tensor {name!r} has a malformed header entry ({bad!r})"
        if end > data_len:
            return (
                f"truncated: tensor {name!r} ends at byte {end} of the data section but the "
                f"file holds only {data_len}"
            )
    return f"not a readable safetensors file ({err})"


def save_file(
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write in-memory tensors atomically, in the order given."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    specs = [(n, tuple(a.shape), np.dtype(a.dtype)) for n, a in items]
    write_streaming(specs, (a for _, a in items), path, metadata)


def write_streaming(
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    arrays: Iterable[np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors whose shapes are known up front while the arrays arrive one at a time.

    Atomic (`io_utils.atomic_file`, synced to disk before the rename). The header comes from
    `specs`, so a model export never holds more than one tensor in host memory.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dt in specs:
        if dt not in _NAMES:
            raise WeightFileError(f"tensor {name!r}: dtype {dt} cannot be written to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {
            "dtype": _NAMES[dt],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with atomic_file(path, fsync=True) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dt), arr in zip(specs, arrays, strict=True):
            if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != dt:
                raise WeightFileError(
                    f"tensor {name!r}: got {arr.shape} {arr.dtype}, announced {shape} {dt}"
                )
            # Hosts are little-endian (x86, Arm): raw bytes are the on-disk layout.
            f.write(np.ascontiguousarray(arr).tobytes())
