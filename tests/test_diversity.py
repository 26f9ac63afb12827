"""Diversity steps (davir_jax.core.diversity) against brute-force O(N^2) NumPy references
written here independently: DEITA's threshold filter, Superfiltering.D's facility location,
MinHash near-duplicate removal."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from davir_jax.core import diversity as dv

# ---------------------------------------------------------------- data


def clustered(seed: int, n: int = 120, d: int = 16, centres: int = 8, noise: float = 0.15):
    """Embeddings float32 [n, d] around a few centres (so diversity removes items), scores."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    e = c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, d))
    return e.astype(np.float32), rng.normal(size=n)


def unit(e):
    e = np.asarray(e, np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho".split()


def mutated_texts(seed: int, n: int = 80, bases: int = 10, length: int = 30):
    """Texts that are few-word edits of a handful of base texts."""
    rng = np.random.default_rng(seed)
    base = [list(rng.choice(WORDS, length)) for _ in range(bases)]
    out = []
    for _ in range(n):
        words = list(base[rng.integers(bases)])
        for _ in range(rng.integers(0, 4)):
            words[rng.integers(length)] = str(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


# ---------------------------------------------------------------- brute-force references


def brute_threshold(e, order, k, tau):
    x = unit(e)
    sel, removed = [], []
    for i in order:
        if len(sel) >= k:
            break
        d = [1.0 - float(np.dot(x[i], x[j])) for j in sel]
        if not d or min(d) > tau:
            sel.append(int(i))
        else:
            removed.append((int(i), sel[int(np.argmin(d))]))
    return sel, removed


def brute_facility(e, scores, k, pool):
    """Plain greedy, f recomputed from scratch for every candidate; sims in the module's
    documented fixed point, round(2^24 (1 + cos)/2), so f is an exact integer."""
    x = unit(e)
    ranking = sorted(range(len(e)), key=lambda i: (-scores[i], i))[:pool]
    sim = {}
    for i in ranking:
        for j in ranking:
            c = 1.0 if i == j else float(np.dot(x[min(i, j)], x[max(i, j)]))
            sim[i, j] = int(np.rint(min(max((1.0 + c) / 2.0, 0.0), 1.0) * 2**24))

    def f(s):
        return sum(max(sim[i, j] for j in s) for i in ranking) if s else 0

    chosen = []
    for _ in range(min(k, len(ranking))):
        best, best_f = None, -1
        for j in ranking:  # rank order: a strictly better value is needed to displace
            if j not in chosen and f(chosen + [j]) > best_f:
                best, best_f = j, f(chosen + [j])
        chosen.append(best)
    return chosen


def brute_near_dups(sig, order, t, bands=None):
    """Pairwise walk; `bands`: only pairs with an entirely equal band count (LSH's rule)."""
    p = sig.shape[1]
    kept, dup = [], np.full(len(sig), -1)
    for i in order:
        best, best_j = -1.0, -1
        for j in kept:
            if bands is not None:
                r = p // bands
                if not any((sig[i, b * r : (b + 1) * r] == sig[j, b * r : (b + 1) * r]).all()
                           for b in range(bands)):  # fmt: skip
                    continue
            jac = np.count_nonzero(sig[i] == sig[j]) / p
            if jac >= t and jac > best:
                best, best_j = jac, j
        if best_j >= 0:
            dup[i] = best_j
        else:
            kept.append(i)
    keep = np.zeros(len(sig), bool)
    keep[kept] = True
    return keep, dup


def shingles(text, n=5):
    t = " ".join(text.lower().split())
    return {t} if len(t) <= n else {t[i : i + n] for i in range(len(t) - n + 1)}


# ---------------------------------------------------------------- threshold (DEITA)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("block", [7, 256])
def test_threshold_select_equals_brute_force(seed, block, monkeypatch):
    monkeypatch.setattr(dv, "_ROWS_PER_BLOCK", block)
    e, s = clustered(seed, n=150)
    order = np.argsort(-s, kind="stable")
    for k, tau in [(40, 0.05), (150, 0.02), (10, 0.3), (1000, 0.01)]:
        sel, removed = dv.threshold_select(e, order, k, tau)
        ref_sel, ref_removed = brute_threshold(e, order, k, tau)
        assert sel.tolist() == ref_sel
        assert removed.tolist() == [list(p) for p in ref_removed]
        assert len(removed) > 0  # the clusters make the filter remove items


def test_threshold_select_subset_order_and_k_edges():
    e, s = clustered(5, n=60)
    order = np.argsort(-s)[::2]  # a subset of the rows
    sel, removed = dv.threshold_select(e, order, 100, 0.05)
    assert sel.tolist() == brute_threshold(e, order, 100, 0.05)[0]
    assert set(sel) | set(removed[:, 0]) == set(order.tolist())  # k > N: all that qualify
    sel0, removed0 = dv.threshold_select(e, order, 0, 0.05)
    assert sel0.shape == (0,) and removed0.shape == (0, 2)


def test_threshold_keeps_one_of_identical_embeddings():
    e = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (20, 1))
    sel, removed = dv.threshold_select(e, np.arange(20)[::-1], 5, 0.1)
    assert sel.tolist() == [19]
    assert removed.tolist() == [[i, 19] for i in range(18, -1, -1)]


def test_threshold_errors_name_the_row():
    e, _ = clustered(0, n=10)
    e[6] = 0
    with pytest.raises(ValueError, match="row 6 is a zero vector"):
        dv.threshold_select(e, np.arange(10), 3, 0.1)
    e[6] = 1
    e[4, 2] = np.nan
    with pytest.raises(ValueError, match="nan or inf in row 4"):
        dv.threshold_select(e, np.arange(10), 3, 0.1)
    e[4, 2] = 1
    for tau in (0.0, -0.1, 2.5, np.nan):
        with pytest.raises(ValueError, match="min_distance"):
            dv.threshold_select(e, np.arange(10), 3, tau)
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        dv.threshold_select(e, np.arange(10), -1, 0.1)
    with pytest.raises(ValueError, match="more than once"):
        dv.threshold_select(e, [1, 1], 3, 0.1)
    with pytest.raises(ValueError, match="outside"):
        dv.threshold_select(e, [10], 3, 0.1)
    with pytest.raises(ValueError, match="2-D float"):
        dv.threshold_select(e[0], [0], 3, 0.1)


# ---------------------------------------------------------------- facility location


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [5, 256])
def test_facility_location_equals_brute_force_greedy(seed, block, monkeypatch):
    monkeypatch.setattr(dv, "_ROWS_PER_BLOCK", block)
    e, s = clustered(seed, n=60, centres=5)
    for k, pool in [(8, None), (12, 40), (60, 60)]:
        got = dv.facility_location_select(e, s, k, pool)
        ref = brute_facility(e, s, k, min(len(e), 3 * k) if pool is None else pool)
        assert got.tolist() == ref


def test_facility_location_spreads_over_clusters_and_respects_the_pool():
    rng = np.random.default_rng(7)
    label = rng.integers(0, 6, 200)
    e = rng.normal(size=(6, 16))[label] + 0.05 * rng.normal(size=(200, 16))
    s = rng.normal(size=200)
    got = dv.facility_location_select(e, s, 6, pool=200)
    assert sorted(label[got].tolist()) == list(range(6))  # one per cluster
    assert len(set(label[np.argsort(-s)[:6]])) < 6  # which the top 6 by score are not
    got = dv.facility_location_select(e, s, 5)  # default pool: the 15 best scores
    assert set(got) <= set(np.argsort(-s, kind="stable")[:15].tolist())


def test_facility_location_order_ties_edges_and_memory_guard():
    e, s = clustered(3, n=30)
    order = np.argsort(-s, kind="stable")[::-1]  # any ranking; its first items break ties
    got = dv.facility_location_select(e, s, 4, 10, order=order)
    assert set(got) <= set(order[:10].tolist())
    assert dv.facility_location_select(e, s, 0).shape == (0,)
    assert sorted(dv.facility_location_select(e, s, 100).tolist()) == list(range(30))
    with pytest.raises(ValueError, match=r"pool of 30 needs a 30x30 int32 .* 3600 bytes"):
        dv.facility_location_select(e, s, 5, 30, max_bytes=3599)
    with pytest.raises(ValueError, match="smaller than k"):
        dv.facility_location_select(e, s, 5, 3)
    bad = s.copy()
    bad[9] = np.nan
    with pytest.raises(ValueError, match="first at row 9"):
        dv.facility_location_select(e, bad, 5)
    with pytest.raises(ValueError, match=r"shape \(29,\)"):
        dv.facility_location_select(e, s[:-1], 5)


# ---------------------------------------------------------------- MinHash


def test_universal_hash_is_exact_mod_mersenne():
    rng = np.random.default_rng(0)
    p = (1 << 61) - 1
    h = rng.integers(0, p, 50, dtype=np.uint64)
    h[:3] = [0, p - 1, p - 2]
    a = rng.integers(1, p, 9, dtype=np.uint64)
    a[0] = p - 1
    b = rng.integers(0, p, 9, dtype=np.uint64)
    b[0] = p - 1
    got = dv.universal_hash(h, a, b)
    want = [[(int(ai) * int(hi) + int(bi)) % p for ai, bi in zip(a, b)] for hi in h]
    assert got.tolist() == want


def test_minhash_estimates_jaccard():
    texts = mutated_texts(0, n=12, bases=3)
    texts += ["the quick brown fox jumps over the lazy dog", "the quick brown fox jumps high"]
    sig = dv.minhash_signatures(texts, num_perm=256)
    assert sig.shape == (len(texts), 256) and sig.dtype == np.uint64
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            a, b = shingles(texts[i]), shingles(texts[j])
            true = len(a & b) / len(a | b)
            assert abs(np.mean(sig[i] == sig[j]) - true) < 0.1


def test_minhash_is_deterministic_across_calls_chunks_and_processes(monkeypatch):
    texts = mutated_texts(1, n=20) + ["", "abc", "x" * 3000]
    sig = dv.minhash_signatures(texts, num_perm=32, seed=3)
    assert (sig == dv.minhash_signatures(texts, num_perm=32, seed=3)).all()
    assert (sig != dv.minhash_signatures(texts, num_perm=32, seed=4)).mean() > 0.9
    monkeypatch.setattr(dv, "_SHINGLES_PER_CHUNK", 37)
    monkeypatch.setattr(dv, "_TEXTS_PER_GROUP", 3)
    assert (sig == dv.minhash_signatures(texts, num_perm=32, seed=3)).all()
    code = (
        "import json, sys; from davir_jax.core.diversity import minhash_signatures as m; "
        "print(json.dumps(m(json.loads(sys.stdin.read()), num_perm=32, seed=3).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), text=True,
                         capture_output=True, check=True)  # fmt: skip
    assert json.loads(out.stdout) == sig.tolist()  # blake2b, not the per-process salted hash


def test_minhash_empty_and_short_texts():
    sig = dv.minhash_signatures(["", "   \n", "ab", "AB ", "abc", "hello world"], num_perm=16)
    assert (sig[0] == dv.EMPTY_HASH).all() and (sig[1] == sig[0]).all()
    assert (sig[2] == sig[3]).all() and (sig[2] != sig[4]).any()  # one shingle: the text
    assert not (sig[2:] == dv.EMPTY_HASH).any()
    assert dv.minhash_signatures([], num_perm=8).shape == (0, 8)
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        dv.minhash_signatures(["a", 3])
    with pytest.raises(ValueError, match="num_perm"):
        dv.minhash_signatures(["a"], num_perm=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_duplicates_with_one_row_bands_equals_pure_brute_force(seed):
    texts = mutated_texts(seed)
    sig = dv.minhash_signatures(texts, num_perm=64, seed=seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    for t in (0.5, 0.7, 0.9):
        keep, dup = dv.near_duplicates(sig, order, t, bands=64)
        ref_keep, ref_dup = brute_near_dups(sig, order, t)
        assert (keep == ref_keep).all() and (dup == ref_dup).all()
        assert 0 < keep.sum() < len(texts)


@pytest.mark.parametrize("seed", [0, 1])
def test_near_duplicates_equals_brute_force_with_the_lsh_candidate_rule(seed):
    texts = mutated_texts(seed + 10)
    sig = dv.minhash_signatures(texts, num_perm=64, seed=seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    for t, bands in [(0.8, None), (0.7, 8), (0.6, 4)]:
        b = dv.choose_bands(64, t) if bands is None else bands
        keep, dup = dv.near_duplicates(sig, order, t, bands=bands)
        ref_keep, ref_dup = brute_near_dups(sig, order, t, bands=b)
        assert (keep == ref_keep).all() and (dup == ref_dup).all()


def test_choose_bands():
    assert dv.choose_bands(128, 0.8) == 32
    assert dv.choose_bands(128, 1.0) == 1  # identical signatures only
    assert dv.choose_bands(7, 0.01) == 7


def test_exact_duplicates_keep_the_best_scored_copy():
    texts = ["Hello   World, this is a test.", "a different text entirely", "", "   ",
             "hello world, THIS is a test.", "\thello world,\nthis is a test. "]  # fmt: skip
    scores = np.array([0.1, 0.5, 0.2, 0.3, 0.9, 0.4])
    order = np.argsort(-scores)
    res = dv.minhash_dedupe(texts, order, threshold=0.99)
    assert res.selected.tolist() == [4, 1, 3]
    assert sorted(res.removed.tolist()) == [[0, 4], [2, 3], [5, 4]]
    with pytest.raises(ValueError, match="must rank all"):
        dv.near_duplicates(dv.minhash_signatures(texts), order[:3])
    with pytest.raises(ValueError, match="threshold"):
        dv.near_duplicates(dv.minhash_signatures(texts), order, 0.0)
    with pytest.raises(ValueError, match="does not divide"):
        dv.near_duplicates(dv.minhash_signatures(texts), order, 0.8, bands=5)


# ---------------------------------------------------------------- manifest entries


def test_manifest_entries_count_everything_and_cap_the_pairs():
    e, s = clustered(0, n=150)
    order = np.argsort(-s, kind="stable")
    res = dv.threshold_diversity(e, order, 150, 0.05)
    m = res.manifest(max_pairs=3)
    assert m["method"] == "threshold" and m["min_distance"] == 0.05
    assert m["n_removed"] == len(res.removed) > 3 and len(m["removed"]) == 3
    assert m["removed_truncated"] and m["n_considered"] == 150
    assert m["n_selected"] + m["n_removed"] == 150
    json.dumps(m)
    fl = dv.facility_location_diversity(e, s, 10, 30).manifest()
    assert fl["n_considered"] == 30 and fl["n_selected"] == 10 and fl["n_removed"] == 20
    assert not fl["removed_truncated"]
    chosen = dv.facility_location_select(e, s, 10, 30)
    assert all(kept in chosen for _, kept in fl["removed"])
    mh = dv.minhash_dedupe(mutated_texts(0), np.arange(80), 0.7).manifest()
    assert mh["method"] == "minhash" and mh["bands"] == dv.choose_bands(128, 0.7)
    assert mh["n_selected"] + mh["n_removed"] == mh["n_considered"] == 80
    json.dumps(mh)
