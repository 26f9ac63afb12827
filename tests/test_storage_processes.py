"""Parts of one token store built by several processes at once (no lock between them) give the
same store, file for file, as one process building them in turn; a build writes nothing to
stdout (it is not a download)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np

from davir_jax.data.storage import TokenizedStore, build_part

N, PARTS = 60, 3


def _records(part: int) -> list[dict]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(N):
        n = int(rng.integers(0, 50))
        ids, mask = rng.integers(0, 32_000, n), rng.random(n) > 0.3
        if i % PARTS == part:
            out.append({"index": i, "example_id": f"r{i}", "input_ids": ids, "loss_mask": mask})
    return out


def _build(directory: str, part: int, start: mp.synchronize.Barrier) -> None:
    start.wait(timeout=120)  # all processes write at the same time
    build_part(Path(directory), part, PARTS, _records(part), {"part": part})


def _files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
    }


def test_parts_built_at_once_by_processes_equal_a_serial_build(tmp_path, capfd):
    ctx = mp.get_context("spawn")  # a fresh interpreter each, as on separate hosts
    start = ctx.Barrier(PARTS)
    procs = [
        ctx.Process(target=_build, args=(str(tmp_path / "together"), p, start))
        for p in range(PARTS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * PARTS
    for p in range(PARTS):
        build_part(tmp_path / "serial", p, PARTS, _records(p), {"part": p})

    together, serial = _files(tmp_path / "together"), _files(tmp_path / "serial")
    assert sorted(together) == sorted(serial)
    shards = [name for name in together if name.endswith(".array_record-00000-of-00001")]
    assert len(shards) == PARTS
    for name in together:
        # A tf.train.Example's feature map may serialize its keys in another order in another
        # process, so the shards are compared by their decoded records below.
        if name not in shards:
            assert together[name] == serial[name], name
    assert not [p.name for p in (tmp_path / "together").iterdir() if p.name.startswith(".")]

    want = sorted((r for p in range(PARTS) for r in _records(p)), key=lambda r: r["index"])
    for store in (TokenizedStore(tmp_path / "together"), TokenizedStore(tmp_path / "serial")):
        assert len(store) == N
        for got, rec in zip(store.get_many(range(N)), want, strict=True):
            assert (got["index"], got["example_id"]) == (rec["index"], rec["example_id"])
            np.testing.assert_array_equal(got["input_ids"], rec["input_ids"])
            np.testing.assert_array_equal(got["loss_mask"], rec["loss_mask"].astype(np.uint8))
    assert capfd.readouterr().out == ""  # no "Downloading and preparing dataset" banner
