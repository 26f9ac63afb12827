"""Top-k selection, budgets, pool syntax and mixtures (NumPy / plain-Python oracles)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from score_tables import write_scores_dir

from davir_jax.core.scores import random_uniform
from davir_jax.core.selection import Budget, budget_count, select_top
from davir_jax.jobs.select import Pool, parse_pool, run_select, select_mixture


def _oracle_top(ids: list[str], score: np.ndarray, k: int) -> list[int]:
    return sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))[:k]


# ---------------------------------------------------------------------------------------------
# select_top and budgets


def test_select_top_breaks_ties_by_id():
    idx = select_top(np.array([1.0, 2.0, 2.0, 0.0, 2.0]), ["d", "c", "a", "b", "e"], count=4)
    assert idx.tolist() == [2, 1, 4, 0]  # a, c, e (all 2.0) then d (1.0)
    assert idx.dtype == np.int64


def test_select_top_is_independent_of_row_order():
    rng = np.random.default_rng(0)
    ids = np.array([f"s:{i}" for i in range(400)])
    s = rng.integers(0, 20, 400).astype(float)  # many ties
    want = ids[select_top(s, ids, fraction=0.3)]
    assert want.tolist() == [ids[i] for i in _oracle_top(list(ids), s, 120)]
    for seed in range(3):
        p = np.random.default_rng(seed).permutation(400)
        assert ids[p][select_top(s[p], ids[p], fraction=0.3)].tolist() == want.tolist()


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(50_000, 0.06, 3000), (100, 0.07, 7), (3, 0.5, 2), (10, 0.25, 3), (10, 0.24, 2), (7, 1.0, 7)],
)
def test_fraction_rounds_half_up_exactly(n, fraction, k):
    assert budget_count(n, fraction=fraction) == k


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, r"outside \[1, 10\]"),
        ({"count": 11}, r"outside \[1, 10\]"),
        ({"count": 2.5}, "integer"),
        ({"count": True}, "integer"),
        ({"fraction": 0.0}, r"outside \(0, 1\]"),
        ({"fraction": 1.5}, r"outside \(0, 1\]"),
        ({"fraction": float("nan")}, r"outside \(0, 1\]"),
        ({"fraction": 0.01}, "rounds to 0"),
        ({}, "exactly one"),
        ({"count": 1, "fraction": 0.5}, "exactly one"),
    ],
)
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        budget_count(10, **kwargs)


def test_select_top_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="nan.*'b'"):
        select_top(np.array([1.0, np.nan]), ["a", "b"], count=1)
    with pytest.raises(ValueError, match="empty pool"):
        select_top(np.array([]), [], count=1)


# ---------------------------------------------------------------------------------------------
# Pool syntax


def test_parse_pool_forms():
    p = parse_pool("alpaca=runs/a:fraction=0.06")
    assert (p.name, p.scores_dir, p.budget) == ("alpaca", Path("runs/a"), Budget("fraction", 0.06))
    assert parse_pool("gsm8k=runs/g:all").budget == Budget("all")
    assert parse_pool("x=runs/x:count=3000").budget == Budget("count", 3000)
    p = parse_pool("runs/a:fraction=0.06")
    assert p.name is None and p.scores_dir == Path("runs/a")
    # '=' inside a path is not a name.
    p = parse_pool("runs/lr=1e-5:all")
    assert p.name is None and p.scores_dir == Path("runs/lr=1e-5")
    assert Pool("a", "d", 0.5).budget == Budget("fraction", 0.5)
    assert Pool("a", "d", 5).budget == Budget("count", 5)
    assert Pool("a", "d", "all").budget.spec() == "all"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("runs/a", r"\[NAME=\]SCORES_DIR:BUDGET"),
        (":all", r"\[NAME=\]SCORES_DIR:BUDGET"),
        ("a=runs/a:fraction", "BUDGET is one of"),
        ("a=runs/a:size=3", "BUDGET is one of"),
        ("a=runs/a:fraction=abc", "fraction must be a number"),
        ("a=runs/a:fraction=2", r"fraction must be in \(0, 1\]"),
        ("a=runs/a:count=1.5", "count must be a whole number"),
        ("a=runs/a:count=0", "count must be an integer >= 1"),
        ("=runs/a:all", "empty name"),
        ("a=:all", "empty scores directory"),
        ("bad name=runs/a:all", "bad pool name"),
    ],
)
def test_parse_pool_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_pool(spec)


# ---------------------------------------------------------------------------------------------
# Mixtures


def test_mixture_top_fraction_of_a_plus_all_of_b(tmp_path):
    a = write_scores_dir(tmp_path / "runs" / "a", "alpaca", 200, seed=0)
    b = write_scores_dir(tmp_path / "runs" / "b", "gsm8k", 9, seed=1)
    out = tmp_path / "sel"
    m = select_mixture(
        [Pool("A", tmp_path / "runs" / "a", 0.06), Pool("B", tmp_path / "runs" / "b", "all")],
        "davir",
        0,
        out,
    )
    assert sorted(p.name for p in out.iterdir()) == ["A.jsonl", "B.jsonl", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == m

    for name, src, info, k in (("A", "alpaca", a, 12), ("B", "gsm8k", b, 9)):
        ids = [f"{src}:{i}" for i in range(len(info["lb"]))]
        d = (info["lb"] - info["lr"]) / info["lb"]
        top = _oracle_top(ids, d, k)
        lines = (out / f"{name}.jsonl").read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and lines[:-1] == [info["records"][i] for i in top]
        sel = [s for s in m["selected"] if s["pool"] == name]
        assert [s["example_id"] for s in sel] == [ids[i] for i in top]
        assert [s["rank"] for s in sel] == list(range(1, k + 1))
        np.testing.assert_allclose([s["score"] for s in sel], d[top], rtol=1e-12)
        entry = next(p for p in m["pools"] if p["name"] == name)
        f = tmp_path / "runs" / name.lower() / "scores.parquet"
        assert entry["scores"] == str(f.resolve())
        assert entry["data"] == info["manifest"]["data"]
        assert entry["template"] == "alpaca"
        assert (entry["n_pool"], entry["n_selected"], entry["file"]) == (
            len(ids),
            k,
            f"{name}.jsonl",
        )
        assert m["inputs"][name] == {
            "scores_sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
            "fingerprints": info["manifest"]["fingerprints"],
        }
    assert m["pools"][0]["budget"] == {"spec": "fraction=0.06", "kind": "fraction", "value": 0.06}
    assert m["pools"][1]["budget"] == {"spec": "all", "kind": "all"}
    assert (m["method"], m["seed"], m["n_selected"]) == ("davir", 0, 21)
    # Ties exist in this data, so the id tie-break was exercised.
    d = (a["lb"] - a["lr"]) / a["lb"]
    assert len(np.unique(d)) < len(d)


def test_run_select_names_pools_from_manifest_and_replaces_previous_output(tmp_path):
    info = write_scores_dir(tmp_path / "runs" / "g", "gsm8k", 30, seed=2)
    out = tmp_path / "sel"
    m = run_select([f"{tmp_path}/runs/g:count=5"], "random", str(out), seed=3)
    assert m["pools"][0]["name"] == "gsm8k"  # the table's only `source` value
    ids = [f"gsm8k:{i}" for i in range(30)]
    top = _oracle_top(ids, random_uniform(ids, 3), 5)
    assert (out / "gsm8k.jsonl").read_text().splitlines() == [info["records"][i] for i in top]
    # A second run replaces the previous selection output entirely.
    run_select([f"g={tmp_path}/runs/g:count=2"], "rho", str(out), seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["g.jsonl", "manifest.json"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_multiline_records_become_one_line_and_bad_records_fail(tmp_path):
    recs = ['{\n "instruction": "a",\n "output": "b"\n}', '{"instruction": "c", "output": "é"}']
    write_scores_dir(tmp_path / "m", "m", 2, seed=0, records=recs)
    select_mixture([Pool("m", tmp_path / "m", "all")], "rho", 0, tmp_path / "o")
    lines = (tmp_path / "o" / "m.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(x)["instruction"] for x in lines) == ["a", "c"]
    assert '{"instruction": "c", "output": "é"}' in lines  # single-line records kept verbatim

    write_scores_dir(tmp_path / "bad", "bad", 2, seed=0, records=["[1, 2]", "{}"])
    with pytest.raises(ValueError, match="record of bad:.* not a JSON object"):
        select_mixture([Pool("bad", tmp_path / "bad", "all")], "rho", 0, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_mixture_refusals(tmp_path):
    write_scores_dir(tmp_path / "a", "alpaca", 10, seed=0)
    write_scores_dir(tmp_path / "b", "alpaca", 10, seed=1)
    pa_ = Pool("x", tmp_path / "a", "all")
    with pytest.raises(ValueError, match="used more than once"):
        select_mixture([pa_, Pool("x", tmp_path / "b", "all")], "davir", 0, tmp_path / "o")
    with pytest.raises(ValueError, match="repeats example"):
        select_mixture([pa_, Pool("y", tmp_path / "b", "all")], "davir", 0, tmp_path / "o")
    with pytest.raises(ValueError, match=r"outside \[1, 10\]"):
        select_mixture([Pool("x", tmp_path / "a", 11)], "davir", 0, tmp_path / "o")
    with pytest.raises(ValueError, match="would replace the scores directory"):
        select_mixture([pa_], "davir", 0, tmp_path)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a previous selection output"):
        select_mixture([pa_], "davir", 0, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="unknown score"):
        select_mixture([pa_], "nope", 0, tmp_path / "o")
    (tmp_path / "a" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no score manifest"):
        select_mixture([pa_], "davir", 0, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_default_pool_name_precedence(tmp_path):
    d = tmp_path / "run-7"
    write_scores_dir(d, "src", 4, seed=0)
    mf = d / "manifest.json"
    m = json.loads(mf.read_text())
    m["data"]["name"] = "alpaca libre"
    mf.write_text(json.dumps(m))
    assert run_select([f"{d}:all"], "rho", str(tmp_path / "o"), 0)["pools"][0]["name"] == (
        "alpaca_libre"
    )
    # No name in the manifest and several sources in one table: the directory's name.
    del m["data"]["name"]
    mf.write_text(json.dumps(m))
    tab = pq.read_table(d / "scores.parquet")
    tab = tab.set_column(1, "source", pa.array(["x", "y", "x", "y"]))
    pq.write_table(tab, d / "scores.parquet")
    assert run_select([f"{d}:all"], "rho", str(tmp_path / "o"), 0)["pools"][0]["name"] == "run-7"


def test_filter_by_one_score_rank_by_another(tmp_path):
    """`--filter "ifd<1" --method davir`: the rows with IFD >= 1 go, the rest are ranked by
    DavIR; the budget counts against the whole pool and a shortfall is reported."""
    rng = np.random.default_rng(3)
    n = 120
    alone = np.round(rng.uniform(20.0, 400.0, n), 1)
    write_scores_dir(tmp_path / "a", "alpaca", n, seed=4)  # no IFD columns
    info = write_scores_dir(tmp_path / "b", "alpaca", n, seed=4, nll_base_alone=alone)
    ifd = info["lb"] / alone
    assert 10 < (ifd >= 1).sum() < n - 10  # both sides of the threshold occur
    ids = [f"alpaca:{i}" for i in range(n)]
    d = (info["lb"] - info["lr"]) / info["lb"]
    passing = [i for i in _oracle_top(ids, d, n) if ifd[i] < 1]
    m = run_select(
        ["b=" + str(tmp_path / "b") + ":count=12"], "davir", str(tmp_path / "o"), 0, ["ifd<1"]
    )
    assert [s["example_id"] for s in m["selected"]] == [ids[i] for i in passing[:12]]
    entry = m["pools"][0]
    assert entry["filters"] == [{"filter": "ifd<1", "removed": int((ifd >= 1).sum())}]
    assert (entry["n_passed"], entry["n_short"], m["filters"]) == (len(passing), 0, ["ifd<1"])
    big = run_select(
        ["b=" + str(tmp_path / "b") + ":all"],
        "davir",
        str(tmp_path / "o"),
        0,
        ["ifd<1", "davir>=0.2"],
    )
    keep = [i for i in passing if d[i] >= 0.2]
    assert [s["example_id"] for s in big["selected"]] == [ids[i] for i in keep]
    assert big["pools"][0]["n_short"] == n - len(keep)
    with pytest.raises(ValueError, match=r"bad filter 'ifd=1'"):
        run_select(
            ["b=" + str(tmp_path / "b") + ":all"], "davir", str(tmp_path / "o"), 0, ["ifd=1"]
        )
    with pytest.raises(ValueError, match=r"ifd_ref needs nll_ref_alone"):
        run_select(
            ["a=" + str(tmp_path / "a") + ":all"], "davir", str(tmp_path / "o"), 0, ["ifd_ref<1"]
        )


def test_diversity_steps_in_select_against_brute_force(tmp_path):
    """minhash drops exact/near-exact duplicate texts (keeping the better-ranked copy); the
    DEITA threshold then walks the ranking accepting rows farther than min_distance (cosine)
    from every accepted row: equal to a brute-force walk; the manifest names what went."""
    rng = np.random.default_rng(5)
    n, k = 80, 10
    texts = [f"question {i} " + " ".join(rng.choice(list("abcdefgh"), 30)) for i in range(n)]
    texts[7] = texts[3].upper()  # the same text up to case: a duplicate
    records = [json.dumps({"instruction": t, "output": "x"}) for t in texts]
    info = write_scores_dir(tmp_path / "p", "pool", n, seed=6, records=records)
    centers = rng.normal(size=(6, 16))
    emb = (centers[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, 16))).astype(np.float32)
    np.save(tmp_path / "p" / "embeddings.npy", emb)
    ids = [f"pool:{i}" for i in range(n)]
    d = (info["lb"] - info["lr"]) / info["lb"]
    ranked = _oracle_top(ids, d, n)
    dup_loser = max((3, 7), key=ranked.index)
    walk = [i for i in ranked if i != dup_loser]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    chosen: list[int] = []
    for i in walk:
        if len(chosen) < k and all(1 - unit[i] @ unit[j] > 0.05 for j in chosen):
            chosen.append(i)
    m = run_select(
        [f"p={tmp_path / 'p'}:count={k}"],
        "davir",
        str(tmp_path / "o"),
        0,
        diversity=["minhash:threshold=0.9", "threshold:min_distance=0.05"],
    )
    assert [s["example_id"] for s in m["selected"]] == [ids[i] for i in chosen]
    mh, th = m["pools"][0]["diversity"]
    keeper = 3 if dup_loser == 7 else 7
    assert mh["n_removed"] == 1 and mh["removed"] == [[ids[dup_loser], ids[keeper]]]
    assert th["method"] == "threshold" and th["n_removed"] > 0  # clusters: some rows too close
    assert m["diversity"] == [
        "minhash:threshold=0.9,num_perm=128,ngram=5",
        "threshold:min_distance=0.05",
    ]
    fl = run_select(
        [f"p={tmp_path / 'p'}:count={k}"], "rho", str(tmp_path / "o"), 0, diversity=["facility"]
    )
    assert len(fl["selected"]) == k and fl["pools"][0]["diversity"][0]["pool"] == 3 * k
    with pytest.raises(ValueError, match="must be the last"):
        run_select(
            [f"p={tmp_path / 'p'}:all"],
            "davir",
            str(tmp_path / "o"),
            0,
            diversity=["facility", "minhash"],
        )
    with pytest.raises(ValueError, match=r"threshold takes min_distance=VALUE"):
        run_select(
            [f"p={tmp_path / 'p'}:all"],
            "davir",
            str(tmp_path / "o"),
            0,
            diversity=["threshold:tau=1"],
        )
    (tmp_path / "p" / "embeddings.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"scoring.embed=base"):
        run_select(
            [f"p={tmp_path / 'p'}:all"], "davir", str(tmp_path / "o"), 0, diversity=["threshold"]
        )


def test_selection_method_specs_and_the_pipeline_config():
    from davir_jax.config import load_config
    from davir_jax.core.selection import SelectionMethod

    assert SelectionMethod.parse("davir") == SelectionMethod("davir", "davir")
    m = SelectionMethod.parse("cherry=ifd;filter=ifd<1;diversity=threshold:min_distance=0.2")
    assert m == SelectionMethod("cherry", "ifd", ("ifd<1",), ("threshold:min_distance=0.2",))
    for bad, match in (
        ("x=nope", "'nope' is not among the scores"),
        ("a/b=davir", "bad label"),
        ("x=davir;fliter=ifd<1", "is not filter=EXPR or diversity=STEP"),
        ("x=davir;filter=ifd=1", "bad filter"),
        ("x=davir;diversity=cluster", "'cluster' is not one of"),
    ):
        with pytest.raises(ValueError, match=match):
            SelectionMethod.parse(bad)
    cfg = load_config(None, ["--pipeline.methods=[davir,cherry=ifd;filter=ifd<1]"])
    assert cfg.pipeline.methods == ("davir", "cherry=ifd;filter=ifd<1")
    with pytest.raises(ValueError, match="labels must differ"):
        load_config(None, ["--pipeline.methods=[davir,davir=rho]"])


def test_minhash_reads_nested_chat_text_and_refuses_textless_records(tmp_path):
    from davir_jax.jobs.select import record_text

    chat = [
        json.dumps({"messages": [{"role": "user", "content": f"question {i} " + "w" * i},
                                 {"role": "assistant", "content": f"answer {i}"}]})
        for i in range(20)
    ]  # fmt: skip
    chat[5] = chat[4]  # one exact duplicate
    assert record_text(chat[0]) == "user\nquestion 0 \nassistant\nanswer 0"
    write_scores_dir(tmp_path / "c", "chat", 20, seed=7, records=chat)
    m = run_select(
        [f"c={tmp_path / 'c'}:all"], "rho", str(tmp_path / "o"), 0, diversity=["minhash"]
    )
    assert m["pools"][0]["diversity"][0]["n_removed"] == 1 and m["n_selected"] == 19
    empty = [json.dumps({"n": i}) for i in range(5)]
    write_scores_dir(tmp_path / "e", "e", 5, seed=7, records=empty)
    with pytest.raises(ValueError, match="no text for --diversity minhash"):
        run_select(
            [f"e={tmp_path / 'e'}:all"], "rho", str(tmp_path / "o2"), 0, diversity=["minhash"]
        )


def test_pipeline_methods_are_checked_against_what_scoring_writes():
    from davir_jax.config import load_config
    from davir_jax.core.schema import ConfigError
    from davir_jax.engine.preflight import UserError, _method_inputs

    ok = ["--pipeline.methods=[davir,c=ifd;filter=ifd<1,d=davir;diversity=facility]"]
    _method_inputs(load_config(None, ok + ["--scoring.ifd=[base]", "--scoring.embed=base"]))
    with pytest.raises(UserError, match=r"'c=ifd;filter=ifd<1' reads nll_base_alone"):
        _method_inputs(load_config(None, ok + ["--scoring.embed=base"]))
    with pytest.raises(UserError, match="needs embeddings: set scoring.embed=base"):
        _method_inputs(load_config(None, ok + ["--scoring.ifd=[base]"]))
    with pytest.raises((ValueError, ConfigError), match="filter score 'idf' is not a score"):
        load_config(None, ["--pipeline.methods=[c=ifd;filter=idf<1]"])
