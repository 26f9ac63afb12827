"""The safetensors reader agrees with the `safetensors` library both ways: files the library
writes read back equal (bf16 included), and files we write (streaming) are what the library
reads. Errors name the file and the tensor."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file as lib_save_file

from davir_jax.models.safetensors_io import (
    SafetensorsFile,
    WeightFileError,
    save_file,
    write_streaming,
)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 2, 3)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (2, 2), dtype=np.int64),
        "u8": rng.integers(0, 255, 9, dtype=np.uint8),
        "flag": rng.random(5) > 0.5,
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_reads_what_the_library_writes(tmp_path):
    want = _tensors()
    p = tmp_path / "lib.safetensors"
    lib_save_file(want, p, metadata={"format": "np", "note": "é"})
    f = SafetensorsFile(p)
    assert sorted(f.keys()) == sorted(want)
    assert f.metadata == {"format": "np", "note": "é"}
    for name, a in want.items():
        got = f.get(name)
        assert got.dtype == a.dtype, name
        assert f.shape(name) == a.shape, name
        # Bit patterns: bf16 NaN-free values compared exactly, as the bytes on disk.
        assert got.tobytes() == np.ascontiguousarray(a).tobytes(), name


def test_the_library_reads_what_we_write_streaming(tmp_path):
    want = _tensors()
    p = tmp_path / "ours.safetensors"
    specs = [(n, a.shape, a.dtype) for n, a in want.items()]
    write_streaming(specs, iter(want.values()), p, metadata={"format": "pt"})
    with safe_open(p, framework="numpy") as lib:
        assert list(lib.offset_keys()) == list(want)  # written in the order given
        assert lib.metadata() == {"format": "pt"}
        for name, a in want.items():
            got = lib.get_tensor(name)
            assert got.dtype == a.dtype and got.shape == a.shape, name
            assert got.tobytes() == np.ascontiguousarray(a).tobytes(), name
    assert SafetensorsFile(p).keys() == list(want)


def test_a_wrong_array_while_streaming_leaves_no_file(tmp_path):
    p = tmp_path / "w.safetensors"
    specs = [("a", (2,), np.dtype(np.float32)), ("b", (3,), np.dtype(np.float32))]
    arrays = iter([np.zeros(2, np.float32), np.zeros(4, np.float32)])
    with pytest.raises(WeightFileError, match=r"tensor 'b': got \(4,\)"):
        write_streaming(specs, arrays, p)
    assert os.listdir(tmp_path) == []  # neither the file nor its temp file


def test_errors_name_the_file_and_the_tensor(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"w": np.ones(4, np.float32), "v": np.ones(2, ml_dtypes.bfloat16)}, p)
    f = SafetensorsFile(p)
    with pytest.raises(WeightFileError, match=r"m\.safetensors: tensor 'nope' is missing"):
        f.get("nope")
    data = p.read_bytes()
    p.write_bytes(data[:-2])
    with pytest.raises(WeightFileError, match=r"m\.safetensors: truncated: tensor 'v' ends at"):
        SafetensorsFile(p)
    p.write_bytes(data[:5])
    with pytest.raises(WeightFileError, match=r"m\.safetensors: truncated \(no safetensors"):
        SafetensorsFile(p)
    p.write_bytes(data + b"\0" * 8)  # bytes no tensor covers: the library refuses the file
    with pytest.raises(WeightFileError, match=r"m\.safetensors: not a readable safetensors"):
        SafetensorsFile(p)
    with pytest.raises(WeightFileError, match=r"gone\.safetensors: weight file not found"):
        SafetensorsFile(tmp_path / "gone.safetensors")
