"""The one atomic-publish family: a failed write leaves the old content and no temp files; a
published folder replaces the old one whole; modes follow the umask."""

from __future__ import annotations

import json
import os
import stat

import pytest

from davir_jax.core.io import (
    atomic_dir,
    atomic_file,
    publish_dir,
    remove_leftovers,
    temp_dir,
    write_atomic,
    write_json,
)


def test_file_is_replaced_whole_or_not_at_all(tmp_path):
    p = tmp_path / "a.txt"
    write_atomic(p, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_file(p) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    write_json(p, {"x": float("nan")})
    assert json.loads(p.read_text()) == {"x": None}


def test_dir_publish_replaces_and_failure_keeps_the_old(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "one").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as d:
        (d / "two").write_text("2")
        raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["one"]
    with atomic_dir(out) as d:
        (d / "two").write_text("2")
    assert sorted(os.listdir(out)) == ["two"]  # replaced whole, not merged
    assert os.listdir(tmp_path) == ["out"]


def test_leftovers_of_a_crash_are_removed(tmp_path):
    out = tmp_path / "out"
    tmp = temp_dir(out)  # a build that never published
    (tmp_path / f".old-{out.name}-cafe").mkdir()  # a crash between the two renames
    (tmp_path / ".old-other-cafe").mkdir()  # another target's: kept
    remove_leftovers(out)
    assert not tmp.exists() and sorted(os.listdir(tmp_path)) == [".old-other-cafe"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "f", b"x")
        tmp = temp_dir(tmp_path / "d")
        publish_dir(tmp, tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
