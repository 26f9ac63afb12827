"""Score functions against hand computations and the properties in docs/method.md."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from davir_jax.core.scores import (
    IFD_SCORES,
    SCORES,
    MissingScoreInput,
    ScoreColumns,
    available_scores,
    compute_scores,
    random_uniform,
    read_scores,
    register_score,
)


def _table(nll_base, nll_ref, n_tokens, ids=None, **more) -> pa.Table:
    n = len(nll_base)
    ids = ids if ids is not None else [f"src:{i}" for i in range(n)]
    return pa.table(
        {
            "example_id": pa.array(ids, pa.string()),
            "source": pa.array(["src"] * n, pa.string()),
            "row": pa.array(range(n), pa.int64()),
            "content_hash": pa.array([f"h{i}" for i in range(n)], pa.string()),
            "n_tokens": pa.array(n_tokens, pa.int64()),
            "nll_base": pa.array(nll_base, pa.float64()),
            "nll_ref": pa.array(nll_ref, pa.float64()),
            "record": pa.array([json.dumps({"output": "x" * i}) for i in range(n)], pa.string()),
            **{k: pa.array(v, pa.float64()) for k, v in more.items()},
        }
    )


def _random_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 300, n)
    lb = t * rng.uniform(0.5, 3.0, n)
    lr = lb * rng.uniform(0.2, 1.1, n)
    return _table(lb, lr, t)


def test_every_score_by_hand():
    # Lb, Lr, T chosen so each score is a round number.
    s = compute_scores(_table([10.0, 4.0, 6.0], [5.0, 3.0, 6.0], [5, 2, 3]), seed=0)
    np.testing.assert_array_equal(s["davir"], [0.5, 0.25, 0.0])
    np.testing.assert_array_equal(s["rho"], [5.0, 1.0, 0.0])
    np.testing.assert_array_equal(s["rho_per_token"], [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(s["loss_base"], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(s["loss_ref"], [1.0, 1.5, 2.0])
    np.testing.assert_array_equal(s["low_loss_base"], [-2.0, -2.0, -2.0])
    np.testing.assert_array_equal(s["low_loss_ref"], [-1.0, -1.5, -2.0])
    ifd = {n for base in IFD_SCORES for n in (base, base + "_per_token")}
    assert set(s) == set(SCORES) - ifd  # a run without the _alone columns offers no IFD
    assert all(v.dtype == np.float64 and v.shape == (3,) for v in s.values())


def test_scores_match_numpy_formulas_on_random_data():
    tab = _random_table(500)
    lb = np.array(tab["nll_base"].to_pylist())
    lr = np.array(tab["nll_ref"].to_pylist())
    t = np.array(tab["n_tokens"].to_pylist(), dtype=float)
    s = compute_scores(tab, seed=3)
    expected = {
        "davir": 1 - lr / lb,
        "rho": lb - lr,
        "rho_per_token": (lb - lr) / t,
        "loss_base": lb / t,
        "loss_ref": lr / t,
        "low_loss_base": -lb / t,
        "low_loss_ref": -lr / t,
    }
    for name, want in expected.items():
        np.testing.assert_allclose(s[name], want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_davir_same_for_summed_and_per_token_nll():
    tab = _random_table(300, seed=1)
    lb = np.array(tab["nll_base"].to_pylist())
    lr = np.array(tab["nll_ref"].to_pylist())
    t = np.array(tab["n_tokens"].to_pylist())
    ids = tab["example_id"].to_pylist()
    summed = compute_scores(tab, "davir")["davir"]
    mean = compute_scores(
        {"example_id": ids, "nll_base": lb / t, "nll_ref": lr / t, "n_tokens": t}, "davir"
    )["davir"]
    np.testing.assert_allclose(mean, summed, rtol=1e-12)
    # RHO, by contrast, is not: the averaged version is rho_per_token.
    rho_mean = compute_scores(
        {"example_id": ids, "nll_base": lb / t, "nll_ref": lr / t, "n_tokens": t}, "rho"
    )["rho"]
    assert not np.allclose(rho_mean, compute_scores(tab, "rho")["rho"])


def test_ranking_by_davir_equals_ranking_by_reduction_over_ref():
    tab = _random_table(1000, seed=2)
    lb = np.array(tab["nll_base"].to_pylist())
    lr = np.array(tab["nll_ref"].to_pylist())
    d = compute_scores(tab, "davir")["davir"]
    # Both are decreasing functions of Lr/Lb, so the orders agree (continuous data: no ties).
    np.testing.assert_array_equal(np.argsort(-d), np.argsort(-(lb - lr) / lr))


def test_random_is_seeded_and_depends_only_on_id():
    tab = _random_table(2000)
    ids = np.array(tab["example_id"].to_pylist())
    a = compute_scores(tab, "random", seed=7)["random"]
    assert np.array_equal(a, compute_scores(tab, "random", seed=7)["random"])
    assert not np.allclose(a, compute_scores(tab, "random", seed=8)["random"])
    assert ((a >= 0) & (a < 1)).all()
    assert abs(a.mean() - 0.5) < 0.03 and len(np.unique(a)) == len(a)
    # Shuffled rows and a subset: each id keeps its value.
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = compute_scores(tab.take(perm), "random", seed=7)["random"]
    np.testing.assert_array_equal(shuffled, a[perm])
    sub = perm[:37]
    np.testing.assert_array_equal(random_uniform(ids[sub], 7), a[sub])
    with pytest.raises(TypeError, match="seed"):
        random_uniform(ids, 1.5)


def test_zero_base_nll_rejected_by_davir_naming_the_id():
    tab = _table([2.0, 0.0, 3.0], [1.0, 0.0, 1.0], [2, 1, 3], ids=["a:0", "a:1", "a:2"])
    with pytest.raises(ValueError, match=r"davir.*nll_base.*a:1"):
        compute_scores(tab, "davir")
    # Scores that do not divide by L_base are defined there.
    np.testing.assert_array_equal(compute_scores(tab, "rho")["rho"], [1.0, 0.0, 2.0])


@pytest.mark.parametrize(
    ("lb", "lr", "t", "match"),
    [
        ([1.0, 2.0], [1.0, 1.0], [3, 0], r"n_tokens.*b:1"),
        ([1.0, np.nan], [1.0, 1.0], [3, 3], r"nll_base is nan or inf.*b:1"),
        ([1.0, 2.0], [np.inf, 1.0], [3, 3], r"nll_ref is nan or inf.*b:0"),
        ([-1.0, 2.0], [1.0, 1.0], [3, 3], r"nll_base is negative.*b:0"),
    ],
)
def test_invalid_inputs_name_the_example(lb, lr, t, match):
    with pytest.raises(ValueError, match=match):
        compute_scores(_table(lb, lr, t, ids=["b:0", "b:1"]), "rho")


def test_duplicate_ids_and_unknown_names_rejected():
    with pytest.raises(ValueError, match=r"unique.*a:0"):
        compute_scores(_table([1.0, 2.0], [1.0, 1.0], [1, 1], ids=["a:0", "a:0"]), "rho")
    with pytest.raises(ValueError, match="unknown score"):
        compute_scores(_table([1.0], [1.0], [1]), ["davir", "nope"])
    with pytest.raises(ValueError, match="n_tokens must be integers"):
        ScoreColumns.from_data(
            {"example_id": ["a"], "nll_base": [1.0], "nll_ref": [1.0], "n_tokens": [1.5]}
        )


def test_ifd_scores_by_hand_and_their_inputs():
    # IFD = L_m / L_m_alone (ratio of sums over the same T tokens = Cherry's ratio of means);
    # per-token form (L_m - L_m_alone) / T.
    tab = _table(
        [4.0, 6.0],
        [3.0, 5.0],
        [2, 3],
        nll_base_alone=[8.0, 3.0],
        nll_ref_alone=[6.0, 10.0],
        nll_proxy=[1.0, 9.0],
        nll_proxy_alone=[4.0, 3.0],
    )
    s = compute_scores(tab)
    np.testing.assert_array_equal(s["ifd"], [0.5, 2.0])
    np.testing.assert_array_equal(s["ifd_per_token"], [-2.0, 1.0])
    np.testing.assert_array_equal(s["ifd_ref"], [0.5, 0.5])
    np.testing.assert_array_equal(s["ifd_ref_per_token"], [-1.5, -5 / 3])
    np.testing.assert_array_equal(s["superfiltering"], [0.25, 3.0])
    np.testing.assert_array_equal(s["superfiltering_per_token"], [-1.5, 2.0])
    assert set(s) == set(SCORES)
    only_base = _table([4.0], [3.0], [2], nll_base_alone=[8.0])
    assert "ifd" in available_scores(only_base) and "ifd_ref" not in available_scores(only_base)
    with pytest.raises(MissingScoreInput, match=r"ifd_ref needs nll_ref_alone.*ifd=\[reference\]"):
        compute_scores(only_base, "ifd_ref")
    with pytest.raises(ValueError, match=r"nll_base_alone, which is 0 for 1 example\(s\) \(src:0"):
        compute_scores(_table([4.0], [3.0], [2], nll_base_alone=[0.0]), "ifd")


def test_a_run_without_a_base_offers_the_scores_it_can():
    n = 3
    tab = _table([1.0] * n, [2.0, 3.0, 4.0], [1, 1, 2]).set_column(
        5, "nll_base", pa.nulls(n, pa.float64())
    )
    assert available_scores(tab) == ["loss_ref", "low_loss_ref", "random"]
    np.testing.assert_array_equal(compute_scores(tab, "loss_ref")["loss_ref"], [2.0, 3.0, 2.0])
    with pytest.raises(MissingScoreInput, match=r"davir needs nll_base: score with a base"):
        compute_scores(tab, "davir")
    partly = tab.set_column(5, "nll_base", pa.array([1.0, None, 2.0], pa.float64()))
    with pytest.raises(ValueError, match=r"nll_base has 1 null value\(s\) of 3"):
        compute_scores(partly, "rho")


def test_register_score_extends_the_registry():
    @register_score("test_half_rho")
    def half_rho(c: ScoreColumns, seed: int) -> np.ndarray:
        return (c.nll_base - c.nll_ref) / 2

    try:
        s = compute_scores(_table([4.0], [2.0], [1]), ["test_half_rho"])
        np.testing.assert_array_equal(s["test_half_rho"], [1.0])
        with pytest.raises(ValueError, match="already registered"):
            register_score("test_half_rho")(half_rho)
    finally:
        del SCORES["test_half_rho"]


def test_read_scores_file_or_dir_and_bad_tables(tmp_path):
    tab = _random_table(5)
    pq.write_table(tab, tmp_path / "scores.parquet")
    assert read_scores(tmp_path).equals(tab)
    assert read_scores(tmp_path / "scores.parquet").equals(tab)

    bad = tmp_path / "bad.parquet"
    pq.write_table(tab.drop_columns(["nll_ref", "record"]), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*'nll_ref', 'record'"):
        read_scores(bad)
    with pytest.raises(FileNotFoundError, match="no scores file"):
        read_scores(tmp_path / "missing")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet is not a readable parquet"):
        read_scores(tmp_path / "junk.parquet")


def test_dpo_refuses_a_scores_table_without_reference_nlls(tmp_path):
    from davir_jax.engine.preflight import UserError, scores_table

    n = 2
    tab = _table([1.0, 2.0], [1.0, 1.0], [1, 1]).set_column(6, "nll_ref", pa.nulls(n, pa.float64()))
    pq.write_table(tab, tmp_path / "scores.parquet")
    scores_table(str(tmp_path), "x", ("example_id", "nll_base"))
    with pytest.raises(UserError, match=r"nll_ref is empty \(that scoring run had no such model\)"):
        scores_table(str(tmp_path), "dpo.reference_scores", ("example_id", "nll_ref"))
