"""A small, strict reader and writer for the safetensors format (no pickle, bf16 included).

We parse the format ourselves (an 8-byte header length, a JSON header, raw little-endian bytes)
so that a truncated file or a lying header is caught with the file and tensor named, tensors are
read one at a time through a memory map, and bfloat16 round-trips through NumPy (ml_dtypes).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

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
    """Random access to the tensors of one `.safetensors` file via a read-only memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightFileError(f"{self.path}: weight file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightFileError(f"{self.path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise WeightFileError(f"{self.path}: truncated header ({n} bytes announced)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightFileError(f"{self.path}: corrupt safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._offset = 8 + n
        self._entries: dict[str, dict] = header
        data_len = size - self._offset
        for name, e in header.items():
            try:
                begin, end = (int(x) for x in e["data_offsets"])
                shape = [int(x) for x in e["shape"]]
                dtype = e["dtype"]
            except (KeyError, TypeError, ValueError) as err:
                raise WeightFileError(
                    f"{self.path}: tensor {name!r} has a malformed header entry ({err!r})"
                ) from err
            if begin < 0 or end < begin or any(x < 0 for x in shape):
                raise WeightFileError(f"{self.path}: tensor {name!r} has invalid offsets/shape")
            if dtype not in _DTYPES:
                raise WeightFileError(
                    f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}"
                )
            want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            if end - begin != want:
                raise WeightFileError(f"{self.path}: tensor {name!r} header is inconsistent")
            if end > data_len:
                raise WeightFileError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {end} of the data "
                    f"section but the file holds only {data_len}"
                )
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise WeightFileError(f"{self.path}: tensor {name!r} is missing")
        e = self._entries[name]
        begin, end = e["data_offsets"]
        raw = self._mm[self._offset + begin : self._offset + end]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def umask_mode(directory: bool = False) -> int:
    """The mode `open`/`mkdir` would give a new file (0o666) or folder (0o777) under the process
    umask: `tempfile.mkstemp` makes 0600 files and `mkdtemp` 0700 folders, which an atomic
    write (temp, then rename) would otherwise publish as private."""
    mask = None
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    except OSError:
        pass
    if mask is None:  # elsewhere: set and restore (not thread-safe, hence the fallback only)
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


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

    Atomic: a temp file in the same folder, fsync, rename. The header comes from `specs`, so a
    model export never holds more than one tensor in host memory.
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
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for (name, shape, dt), arr in zip(specs, arrays, strict=True):
                if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != dt:
                    raise WeightFileError(
                        f"tensor {name!r}: got {arr.shape} {arr.dtype}, announced {shape} {dt}"
                    )
                # Hosts are little-endian (x86, Arm): raw bytes are the on-disk layout.
                f.write(np.ascontiguousarray(arr).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
