"""Tokenized example storage (TFDS array_record, no TensorFlow): round trips, multi-part merge,
atomic/incomplete parts, store keys, validation."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from davir_jax.data import storage
from davir_jax.data.storage import (
    TokenizedStore,
    build_part,
    part_complete,
    part_name,
    store_dir,
    store_key,
    wait_for_parts,
)


def make_records(indices, seed=0, min_len=1, max_len=40):
    rng = np.random.default_rng(seed)
    out = []
    for i in indices:
        n = int(rng.integers(min_len, max_len))
        out.append(
            {
                "index": int(i),
                "example_id": f"ex-{i}-é",  # non-ASCII survives the Text feature
                # int64 like a tokenizer hands out; stored as int32.
                "input_ids": rng.integers(0, 50_000, n, dtype=np.int64),
                "loss_mask": rng.random(n) > 0.5,  # bool; stored as uint8
            }
        )
    return out


def assert_same(got, want):
    assert got["index"] == want["index"]
    assert got["example_id"] == want["example_id"]
    assert got["input_ids"].dtype == np.int32 and got["loss_mask"].dtype == np.uint8
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["loss_mask"], np.asarray(want["loss_mask"], np.uint8))


def test_round_trip(tmp_path):
    recs = make_records(range(30))
    recs.append(  # a zero-length record is stored as such
        {"index": 30, "example_id": "empty", "input_ids": [], "loss_mask": []}
    )
    summary = build_part(tmp_path, 0, 1, iter(recs), {"skipped_overlong": 2})
    lens = [len(r["input_ids"]) for r in recs]
    assert summary["n_records"] == 31 and summary["n_tokens"] == sum(lens)
    assert summary["n_loss_tokens"] == sum(int(np.sum(r["loss_mask"])) for r in recs)
    assert part_complete(tmp_path, 0, 1)

    store = TokenizedStore(tmp_path)
    assert len(store) == 31 and store.num_parts == 1
    np.testing.assert_array_equal(store.indices, np.arange(31))
    np.testing.assert_array_equal(store.lengths, lens)
    assert store.lengths.dtype == np.int32
    assert store.example_ids == [r["example_id"] for r in recs]
    assert store.infos == [{"skipped_overlong": 2}]
    for i, r in enumerate(recs):
        assert_same(store[i], r)
    assert_same(store[-1], recs[-1])
    with pytest.raises(IndexError):
        store[31]

    # Batched access: any order, repeats, negative and numpy indices.
    want = [5, 0, 5, 30, -2, np.int64(7)]
    got = store.get_many(want)
    assert [g["index"] for g in got] == [5, 0, 5, 30, 29, 7]
    for g in got:
        assert_same(g, recs[g["index"]])
    assert store.get_many([]) == []

    # The view travels to data-loader worker processes (readers are reopened there).
    clone = pickle.loads(pickle.dumps(store))
    assert_same(clone[3], recs[3])


def test_parts_merge_in_global_order(tmp_path):
    recs = make_records(range(40), seed=1)
    by_index = {r["index"]: r for r in recs}
    # Part 1 gets its records in reverse order: kept as given inside the part, sorted globally.
    p0 = [r for r in recs if r["index"] % 2 == 0]
    p1 = [r for r in recs if r["index"] % 2 == 1][::-1]
    build_part(tmp_path, 1, 2, p1, {"part": 1})
    build_part(tmp_path, 0, 2, p0, {"part": 0})

    store = TokenizedStore(tmp_path)
    np.testing.assert_array_equal(store.indices, np.arange(40))
    assert store.example_ids == [by_index[i]["example_id"] for i in range(40)]
    np.testing.assert_array_equal(store.lengths, [len(by_index[i]["input_ids"]) for i in range(40)])
    assert store.infos == [{"part": 0}, {"part": 1}]
    for i in range(40):
        assert_same(store[i], by_index[i])
    for g in store.get_many(range(39, -1, -3)):
        assert_same(g, by_index[g["index"]])

    # Inside the part the TFDS data set keeps the order the records came in.
    raw = tfds.builder_from_directory(
        str(storage._builder_dir(tmp_path / part_name(1, 2)))
    ).as_data_source(split="train")
    assert [int(raw[j]["index"]) for j in range(3)] == [39, 37, 35]


def test_gaps_and_duplicates(tmp_path):
    # Skipped examples leave gaps in `index`; that is fine. A duplicate across parts is not.
    build_part(tmp_path, 0, 2, make_records([0, 10, 4]), {})
    build_part(tmp_path, 1, 2, make_records([7]), {})
    np.testing.assert_array_equal(TokenizedStore(tmp_path).indices, [0, 4, 7, 10])
    build_part(tmp_path, 1, 2, make_records([4]), {})
    with pytest.raises(ValueError, match="index 4 appears in more than one record"):
        TokenizedStore(tmp_path)
    with pytest.raises(ValueError, match="index 3 appears twice"):
        build_part(tmp_path, 0, 1, make_records([3, 3]), {})


def test_empty_parts(tmp_path):
    recs = make_records([1, 2])
    assert build_part(tmp_path, 0, 3, [], {"note": "no examples"})["n_records"] == 0
    build_part(tmp_path, 1, 3, iter(recs), {})
    build_part(tmp_path, 2, 3, iter(()), {})
    assert not (tmp_path / part_name(0, 3) / "tfds").exists()  # TFDS cannot write 0 examples
    store = TokenizedStore(tmp_path)
    assert len(store) == 2 and store.infos[0] == {"note": "no examples"}
    assert_same(store[0], recs[0])
    assert [r["index"] for r in store.get_many([1, 0])] == [2, 1]

    only_empty = tmp_path / "only_empty"
    build_part(only_empty, 0, 1, [], {})
    store = TokenizedStore(only_empty)
    assert len(store) == 0 and store.lengths.shape == (0,) and store.example_ids == []


def test_incomplete_part_is_reported_and_rebuilt(tmp_path):
    recs = make_records(range(10), seed=2)
    build_part(tmp_path, 0, 2, [r for r in recs if r["index"] % 2 == 0], {})
    with pytest.raises(FileNotFoundError, match=r"incomplete parts \[1\]") as e:
        TokenizedStore(tmp_path)
    assert str(tmp_path) in str(e.value)

    # What a crash can leave: a part dir without marker (non-atomic copy) and a stale temp dir.
    half = tmp_path / part_name(1, 2)
    (half / "tfds").mkdir(parents=True)
    np.save(half / "index.npy", np.arange(3))
    stale = tmp_path / f".tmp-{part_name(1, 2)}-deadbeef"
    stale.mkdir()
    (stale / "junk").write_text("x")
    (tmp_path / f".old-{part_name(1, 2)}-cafe").mkdir()  # crash between the two renames
    assert not part_complete(tmp_path, 1, 2)
    with pytest.raises(FileNotFoundError, match=r"incomplete parts \[1\]"):
        TokenizedStore(tmp_path)

    # A build that dies mid-stream publishes nothing and leaves no temp dir behind.
    def dying():
        yield recs[1]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        build_part(tmp_path, 1, 2, dying(), {})
    assert not part_complete(tmp_path, 1, 2)
    assert not list(tmp_path.glob(".tmp-*"))

    build_part(tmp_path, 1, 2, [r for r in recs if r["index"] % 2 == 1], {})
    assert part_complete(tmp_path, 1, 2)
    assert not list(tmp_path.glob(".*"))  # no temp or old copies left
    store = TokenizedStore(tmp_path)
    for i in range(10):
        assert_same(store[i], recs[i])

    # Rebuilding a complete part replaces it.
    build_part(tmp_path, 1, 2, make_records([1], seed=9), {"v": 2})
    store = TokenizedStore(tmp_path)
    assert store.infos[1] == {"v": 2} and list(store.indices) == [0, 1, 2, 4, 6, 8]


def test_missing_store_and_num_parts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenizedStore(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no parts"):
        TokenizedStore(tmp_path)
    # An older complete build with another host count does not get in the way.
    build_part(tmp_path, 0, 1, make_records([0, 1]), {})
    build_part(tmp_path, 0, 2, make_records([0]), {})
    assert TokenizedStore(tmp_path).num_parts == 1
    with pytest.raises(FileNotFoundError, match=r"parts \[1\] of 2"):
        TokenizedStore(tmp_path, num_parts=2)
    build_part(tmp_path, 1, 2, make_records([1]), {})
    assert TokenizedStore(tmp_path, num_parts=2).num_parts == 2
    with pytest.raises(ValueError, match="part must be in"):
        build_part(tmp_path, 2, 2, [], {})


def test_store_key_and_dir(tmp_path):
    fields = {
        "data_sha256": "ab" * 32,
        "tokenizer": "smollm2-135m:1234",
        "template": "chatml",
        "max_length": 2048,
        "reader": {"format": "jsonl", "text_field": "text"},
        "overlong": "skip",
    }
    key = store_key(fields)
    assert len(key) == 64 and int(key, 16) >= 0
    reordered = dict(reversed(list(fields.items())))
    reordered["reader"] = {"text_field": "text", "format": "jsonl"}
    assert store_key(reordered) == key
    changed = {
        "data_sha256": "cd" * 32,
        "tokenizer": "smollm2-135m:1235",
        "template": "plain",
        "max_length": 4096,
        "reader": {"format": "jsonl", "text_field": "content"},
        "overlong": "truncate",
    }
    keys = {key}
    for name, value in changed.items():
        keys.add(store_key({**fields, name: value}))
    keys.add(store_key({**fields, "max_length": "2048"}))  # type matters
    keys.add(store_key({**fields, "extra": None}))
    assert len(keys) == len(changed) + 3
    with pytest.raises(TypeError, match="JSON-serializable"):
        store_key({"path": tmp_path})

    d = store_dir(tmp_path, "my data/v1.jsonl", fields)
    assert d == tmp_path / f"my_data_v1.jsonl-{key[:16]}" and d.is_dir()
    assert json.loads((d / "key.json").read_text()) == {"key": key, "fields": fields}
    assert store_dir(tmp_path, "my data/v1.jsonl", reordered) == d  # idempotent
    build_part(d, 0, 1, make_records([0]), {})
    assert TokenizedStore(d).fields == fields
    (d / "key.json").write_text(json.dumps({"key": "0" * 64, "fields": {}}))
    with pytest.raises(ValueError, match="records key"):
        store_dir(tmp_path, "my data/v1.jsonl", fields)


def test_wait_for_parts(tmp_path):
    build_part(tmp_path, 0, 3, make_records([0]), {})
    with pytest.raises(TimeoutError, match=r"missing parts \[1, 2\]") as e:
        wait_for_parts(tmp_path, 3, timeout_s=0.05, poll_s=0.01)
    assert str(tmp_path) in str(e.value)
    build_part(tmp_path, 1, 3, [], {})
    build_part(tmp_path, 2, 3, [], {})
    wait_for_parts(tmp_path, 3, timeout_s=0.05, poll_s=0.01)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"input_ids": [1, 2, 3], "loss_mask": [1, 1]}, "length 3 but loss_mask has length 2"),
        ({"input_ids": [[1, 2]], "loss_mask": [[1, 1]]}, "must be 1-D"),
        ({"input_ids": [1.0, 2.0], "loss_mask": [1, 1]}, "must be integers"),
        ({"input_ids": [1, 2**31], "loss_mask": [1, 1]}, "do not fit int32"),
        ({"input_ids": [-1, 2], "loss_mask": [1, 1]}, "do not fit int32"),
        ({"input_ids": [1, 2], "loss_mask": [1, 2]}, "loss_mask values"),
        ({"index": -1}, "index must be >= 0"),
        ({"index": "3"}, "index must be an integer"),
    ],
)
def test_bad_records_name_the_example(tmp_path, bad, match):
    good = make_records([0, 1])
    rec = {"index": 2, "example_id": "ex-bad", "input_ids": [1, 2], "loss_mask": [0, 1], **bad}
    with pytest.raises(ValueError, match=match) as e:
        build_part(tmp_path, 0, 1, [*good, rec], {})
    assert "ex-bad" in str(e.value)
    assert not part_complete(tmp_path, 0, 1) and not list(tmp_path.iterdir())


def test_bad_record_shapes(tmp_path):
    with pytest.raises(ValueError, match="example_id must be str"):
        build_part(
            tmp_path, 0, 1, [{"index": 0, "example_id": 7, "input_ids": [1], "loss_mask": [1]}], {}
        )
    with pytest.raises(ValueError, match="must have index"):
        build_part(tmp_path, 0, 1, [{"index": 0, "example_id": "a"}], {})
    with pytest.raises(TypeError):
        build_part(tmp_path, 0, 1, [], {"not json": object()})


def test_files_are_array_record_and_no_tensorflow(tmp_path):
    recs = make_records(range(12), seed=3)
    build_part(tmp_path, 0, 1, recs, {})
    bdir = storage._builder_dir(tmp_path / part_name(0, 1))
    shards = sorted(bdir.glob("davir_tokenized-train.array_record-*"))
    assert [s.name for s in shards] == ["davir_tokenized-train.array_record-00000-of-00001"]
    meta = json.loads((bdir / "dataset_info.json").read_text())
    assert meta["fileFormat"] == "array_record" and meta["disableShuffling"] is True
    # Readable by the array_record library itself, one record per example.
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(shards[0]))
    assert reader.num_records() == 12
    reader.close()
    # Sidecars are plain .npy / JSON, loadable without pickle.
    part = tmp_path / part_name(0, 1)
    np.testing.assert_array_equal(np.load(part / "index.npy", allow_pickle=False), range(12))
    assert json.loads((part / "example_ids.json").read_text()) == [r["example_id"] for r in recs]

    assert_same(TokenizedStore(tmp_path)[5], recs[5])
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; cannot show the store works without it")
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


def test_copy_of_store_dir_still_opens(tmp_path):
    # Nothing in a part records its absolute path: a store can be moved or copied (e.g. from a
    # local build to the shared file system).
    build_part(tmp_path / "a", 0, 1, make_records(range(3)), {})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    assert [r["index"] for r in TokenizedStore(tmp_path / "b").get_many([2, 0])] == [2, 0]


def test_quiet_and_settings_restored(tmp_path, capfd):
    from absl import logging as absl_logging
    from tensorflow_datasets.core.utils import tqdm_utils

    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        build_part(tmp_path, 0, 1, make_records(range(3)), {})
        TokenizedStore(tmp_path)[0]
        assert absl_logging.get_verbosity() == absl_logging.INFO
        assert tqdm_utils._active is True
    finally:
        absl_logging.set_verbosity(old)
    out, err = capfd.readouterr()
    assert "davir_tokenized" not in out + err and "Generating" not in out + err
