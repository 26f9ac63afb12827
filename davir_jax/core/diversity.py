"""Diversity steps composable with every score: drop near-duplicates of better-scored items.

A reference fine-tuned on the whole pool learns near-duplicates from each other, so a
relative-reduction score (DavIR, RHO, ...) can rank redundant items high. Three steps, all
walking the score ranking best first (pure NumPy; `order` is e.g. `selection.rank_order`):

| function                   | input               | rule                                        |
| -------------------------- | ------------------- | ------------------------------------------- |
| `near_duplicates`          | MinHash signatures  | drop i if est. Jaccard(i, kept j) >= t      |
| `threshold_select`         | embeddings [N, D]   | DEITA: accept i if min_S (1 - cos) > tau    |
| `facility_location_select` | embeddings, scores  | Superfiltering.D: greedy max f(S)           |

DEITA: Liu et al., "What Makes Good Data for Alignment?", arXiv 2312.15685 (score-first,
then accept an example only when its cosine distance to its nearest selected neighbour
exceeds a threshold). Superfiltering: Li et al., arXiv 2402.00530; its ".D" variant takes
the top items by IFD and then runs facility location on their embeddings.

`DiversityResult` (via `minhash_dedupe`, `threshold_diversity`, `facility_location_diversity`)
is the manifest entry: method, parameters, counts, and (removed, kept) pairs, capped.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MERSENNE_61 = np.uint64((1 << 61) - 1)  # the prime p of the universal hashes a*h + b mod p
EMPTY_HASH = np.uint64(np.iinfo(np.uint64).max)  # every entry of an empty text's signature
MAX_LISTED_PAIRS = 1000  # (removed, kept) pairs a manifest lists; counts are always full
_M31 = np.uint64((1 << 31) - 1)
_M30 = np.uint64((1 << 30) - 1)
_ROWS_PER_BLOCK = 256  # rows of embeddings normalised / compared per matmul
_SHINGLES_PER_CHUNK = 2048  # rows of the [chunk, num_perm] permuted-hash temporaries
_TEXTS_PER_GROUP = 1024


# ---------------------------------------------------------------- validation helpers


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_order(order: Any, n: int, full: bool) -> np.ndarray:
    """int64 [M] distinct indices in [0, n); `full`: must be a permutation of range(n)."""
    o = np.asarray(order)
    if o.ndim != 1 or (o.size and not np.issubdtype(o.dtype, np.integer)):
        raise ValueError(f"order must be a 1-D integer array, got shape {o.shape}, {o.dtype}")
    o = o.astype(np.int64)
    bad = (o < 0) | (o >= n)
    if bad.any():
        raise ValueError(f"order holds index {o[bad][0]} outside [0, {n})")
    if len(np.unique(o)) != len(o):
        raise ValueError("order holds an index more than once")
    if full and len(o) != n:
        raise ValueError(f"order has {len(o)} indices; it must rank all {n} items")
    return o


def _check_scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores have shape {s.shape}, expected ({n},)")
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"scores are nan or inf, first at row {int(np.argmax(bad))}")
    return s


def _row_norms(embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings as a 2-D float array, float64 L2 norms [N]); checked blockwise, no copy.

    Errors name the first row that is nan/inf or a zero vector (no direction, no cosine)."""
    e = np.asarray(embeddings)
    if e.ndim != 2 or not np.issubdtype(e.dtype, np.floating):
        raise ValueError(f"embeddings must be a 2-D float array [N, D], got {e.shape}, {e.dtype}")
    norms = np.empty(len(e), np.float64)
    for a in range(0, len(e), _ROWS_PER_BLOCK):
        blk = e[a : a + _ROWS_PER_BLOCK].astype(np.float64)
        bad = ~np.isfinite(blk).all(axis=1)
        if bad.any():
            raise ValueError(f"embeddings are nan or inf in row {a + int(np.argmax(bad))}")
        norms[a : a + len(blk)] = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    zero = norms == 0
    if zero.any():
        raise ValueError(f"embedding row {int(np.argmax(zero))} is a zero vector")
    return e, norms


def _unit(e: np.ndarray, norms: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 L2-normalised rows `rows` of `e`."""
    return e[rows].astype(np.float64) / norms[rows, None]


# ---------------------------------------------------------------- MinHash


def normalise_text(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


def _shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint64 hashes (< p) of the distinct character n-gram shingles of the normalised text."""
    t = normalise_text(text)
    if not t:
        return np.empty(0, np.uint64)
    grams = {t} if len(t) <= ngram else {t[i : i + ngram] for i in range(len(t) - ngram + 1)}
    raw = b"".join(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest() for g in grams)
    h = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    h = (h & MERSENNE_61) + (h >> np.uint64(61))  # h mod p, then one conditional subtract
    return np.where(h >= MERSENNE_61, h - MERSENNE_61, h)


def _mod61(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """x mod p in place for uint64 x (p = 2^61 - 1: 2^61 = 1 mod p, so fold the top bits)."""
    for _ in range(2):
        np.right_shift(x, np.uint64(61), out=tmp)
        np.bitwise_and(x, MERSENNE_61, out=x)
        x += tmp
    np.subtract(x, MERSENNE_61, out=x, where=x >= MERSENNE_61)
    return x


def universal_hash(h: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a*h + b) mod p, p = 2^61 - 1, exactly in uint64: h [S] and a, b [P], all < p -> [S, P].

    Split a = a1*2^31 + a0, h = h1*2^31 + h0 (a1, h1 < 2^30; a0, h0 < 2^31), so
    a*h = a1*h1*2^62 + (a1*h0 + a0*h1)*2^31 + a0*h0, every product < 2^62, and
    2^62 = 2 mod p; m*2^31 = (m >> 30) + (m & (2^30-1))*2^31 mod p. No term overflows
    (the sum before reduction is < 2^63 + 2^32). In place on two [S, P] buffers.
    """
    h = np.asarray(h, np.uint64)[:, None]
    a0, a1 = a & _M31, a >> np.uint64(31)
    h0, h1 = h & _M31, h >> np.uint64(31)
    mid = a1 * h0
    tmp = a0 * h1
    mid += tmp
    total = a1 * h1
    total <<= np.uint64(1)
    np.right_shift(mid, np.uint64(30), out=tmp)
    total += tmp
    mid &= _M30
    mid <<= np.uint64(31)
    total += mid
    np.multiply(a0, h0, out=tmp)
    total += tmp
    _mod61(total, tmp)
    total += b
    return _mod61(total, tmp)


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(MERSENNE_61), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(MERSENNE_61), size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(
    texts: Sequence[str], num_perm: int = 128, ngram: int = 5, seed: int = 0
) -> np.ndarray:
    """MinHash signatures uint64 [N, num_perm] of the texts' character n-gram shingle sets.

    Text -> `normalise_text` (lowercase, whitespace collapsed) -> the set of its character
    `ngram`-grams (a text shorter than `ngram` is one shingle: itself) -> each shingle hashed
    with blake2b (8 bytes; deterministic across processes, unlike Python's salted `hash`),
    reduced mod p -> sig[i, k] = min over shingles x of (a_k*h(x) + b_k) mod p, p = 2^61 - 1,
    a_k in [1, p), b_k in [0, p) drawn from `np.random.default_rng(seed)`.
    P(sig[i, k] == sig[j, k]) ~= Jaccard(shingles_i, shingles_j), so the fraction of equal
    entries estimates the Jaccard similarity (standard error sqrt(J(1-J)/num_perm)).
    An empty (or all-whitespace) text has every entry `EMPTY_HASH` (2^64 - 1 > any real
    value): empty texts are exact duplicates of each other and share nothing with others.
    """
    num_perm = _check_int("num_perm", num_perm, 1)
    ngram = _check_int("ngram", ngram, 1)
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of str, got one str")
    a, b = _permutations(num_perm, seed)
    sig = np.full((len(texts), num_perm), EMPTY_HASH, np.uint64)
    for g in range(0, len(texts), _TEXTS_PER_GROUP):
        hashes = []
        for i, t in enumerate(texts[g : g + _TEXTS_PER_GROUP]):
            if not isinstance(t, str):
                raise ValueError(f"texts[{g + i}] is {type(t).__name__}, not str")
            hashes.append(_shingle_hashes(t, ngram))
        seg = np.repeat(np.arange(g, g + len(hashes)), [len(h) for h in hashes])
        flat = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        for c in range(0, len(flat), _SHINGLES_PER_CHUNK):
            s = seg[c : c + _SHINGLES_PER_CHUNK]
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
            mins = np.minimum.reduceat(universal_hash(flat[c : c + len(s)], a, b), starts, 0)
            sig[s[starts]] = np.minimum(sig[s[starts]], mins)  # a text may span chunks
    return sig


def choose_bands(num_perm: int, threshold: float, max_miss: float = 0.01) -> int:
    """LSH bands b (a divisor of num_perm, r = num_perm / b rows each) for `threshold`.

    A pair of Jaccard s shares at least one whole band with probability 1 - (1 - s^r)^b
    (an S-curve with midpoint ~ (1/b)^(1/r)). Returns the fewest bands (fewest spurious
    candidates) whose miss probability at s = threshold, (1 - t^r)^b, is <= max_miss;
    num_perm (r = 1) if none is. E.g. num_perm=128, t=0.8 -> b=32, r=4 (miss 5e-8 at 0.8).
    """
    for b in (d for d in range(1, num_perm + 1) if num_perm % d == 0):
        if (1.0 - threshold ** (num_perm // b)) ** b <= max_miss:
            return b
    return num_perm


def _band_buckets(sig: np.ndarray, bands: int) -> np.ndarray:
    """int64 [N, bands]: bucket id of each item's band (equal id <=> equal band, any band)."""
    rows = sig.shape[1] // bands
    out = np.empty((len(sig), bands), np.int64)
    offset = 0
    for j in range(bands):
        _, inv = np.unique(sig[:, j * rows : (j + 1) * rows], axis=0, return_inverse=True)
        out[:, j] = inv.reshape(-1) + offset
        offset += int(inv.max()) + 1 if len(sig) else 0
    return out


def near_duplicates(
    signatures: np.ndarray, order: Any, threshold: float = 0.8, bands: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(keep_mask bool [N], duplicate_of int64 [N]): MinHash near-duplicate removal.

    Walk `order` (a permutation of range(N), the score ranking best first). Item i is dropped
    when some already KEPT item j is an LSH candidate of i and J(i, j) >= threshold, where
    J(i, j) = (number of k with sig[i, k] == sig[j, k]) / num_perm (the estimated Jaccard);
    otherwise i is kept. duplicate_of[i] = the kept j with the largest J (ties: kept first),
    -1 for kept items. Candidates (LSH banding): the num_perm entries are cut into `bands`
    bands of r = num_perm / bands rows; i and j are candidates iff some band is entirely equal
    (default bands: `choose_bands(num_perm, threshold)`). Cost ~ N * bands bucket look-ups,
    not N^2. LSH can miss a pair with J >= threshold with small probability ((1 - J^r)^b for
    true Jaccard J); bands = num_perm (r = 1: every pair sharing any entry is a candidate)
    misses nothing, since J >= threshold > 0 implies a shared entry. Identical normalised texts
    have identical signatures, so exact duplicates are always removed (the best-ranked kept).
    """
    sig = np.asarray(signatures)
    if sig.ndim != 2 or sig.dtype != np.uint64:
        raise ValueError(f"signatures must be uint64 [N, num_perm], got {sig.shape}, {sig.dtype}")
    n, p = sig.shape
    o = _check_order(order, n, full=True)
    t = float(threshold)
    if not 0 < t <= 1:
        raise ValueError(f"threshold={threshold} is outside (0, 1]")
    b = choose_bands(p, t) if bands is None else _check_int("bands", bands, 1)
    if p % b:
        raise ValueError(f"bands={b} does not divide num_perm={p}")
    buckets = _band_buckets(sig, b)
    members: dict[int, list[int]] = {}  # bucket id -> kept items in it, in kept order
    kept_at = np.full(n, -1, np.int64)  # position of each kept item in the walk
    duplicate_of = np.full(n, -1, np.int64)
    for pos, i in enumerate(o.tolist()):
        cands = {j for key in buckets[i].tolist() for j in members.get(key, ())}
        if cands:
            c = np.fromiter(cands, np.int64, len(cands))
            c = c[np.argsort(kept_at[c], kind="stable")]  # kept order: argmax takes the first
            jac = np.count_nonzero(sig[c] == sig[i], axis=1) / p
            if jac.max() >= t:
                duplicate_of[i] = c[int(np.argmax(jac))]
                continue
        kept_at[i] = pos
        for key in buckets[i].tolist():
            members.setdefault(key, []).append(i)
    return kept_at >= 0, duplicate_of


# ---------------------------------------------------------------- DEITA threshold filter


def _resolve_block(rows, near_prev, cos_prev, gram, tau, room, out) -> int:
    """Sequential accept/reject within one block; returns how many of the block it accepted.

    cos_prev/near_prev: best cosine to, and index of, the nearest item accepted before this
    block; gram: the block's own cosines. out = (selected list, removed list, accepted rows)."""
    selected, removed, acc_rows = out
    for r, i in enumerate(rows.tolist()):
        if len(acc_rows) >= room:
            break
        c, j = cos_prev[r], near_prev[r]
        if acc_rows:
            cb = gram[r, acc_rows]
            t = int(np.argmax(cb))
            if cb[t] > c:  # ties go to the earlier (previous-block) item
                c, j = cb[t], int(rows[acc_rows[t]])
        if 1.0 - c > tau:
            selected.append(i)
            acc_rows.append(r)
        else:
            removed.append((i, j))
    return len(acc_rows)


def threshold_select(
    embeddings: np.ndarray, order: Any, k: int, min_distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """DEITA's Repr Filter (arXiv 2312.15685): (selected int64 [s], removed int64 [R, 2]).

    Rows are L2-normalised (in float64); d(i, j) = 1 - cos(i, j) in [0, 2]. Walk `order`
    (distinct indices, best first; may be a subset, e.g. after `near_duplicates`) and accept i
    when min_{j in S} d(i, j) > min_distance (S = items accepted so far; the first item is
    always accepted), until k are accepted or `order` ends (k > len(order): all that qualify).
    DEITA uses cosine similarity < 0.9, i.e. min_distance = 0.1.
    selected: accepted items in acceptance order. removed: rows (i, j) for each item i rejected
    before the k-th acceptance, j = its nearest accepted item (ties: accepted first).
    Blocked but exactly the sequential rule: a block of B candidates is compared with the
    accepted set by one matmul ([B, D] @ [D, m]) and then resolved one by one against the items
    accepted inside the block. Memory O(k*D + B*(k + D)); time O(len(order) * k * D).
    min_distance must be in (0, 2] (at 0, float rounding of cos(x, x) would decide).
    """
    e, norms = _row_norms(embeddings)
    o = _check_order(order, len(e), full=False)
    k = _check_int("k", k, 0)
    tau = float(min_distance)
    if not 0 < tau <= 2:
        raise ValueError(f"min_distance={min_distance} is outside (0, 2]")
    room = min(k, len(o))
    acc = np.empty((room, e.shape[1]), np.float64)  # the accepted set, normalised
    selected: list[int] = []
    removed: list[tuple[int, int]] = []
    for a in range(0, len(o), _ROWS_PER_BLOCK):
        m = len(selected)
        if m >= room:
            break
        rows = o[a : a + _ROWS_PER_BLOCK]
        x = _unit(e, norms, rows)
        cos_prev = np.full(len(rows), -np.inf)
        near_prev = np.full(len(rows), -1, np.int64)
        if m:
            sims = x @ acc[:m].T
            best = np.argmax(sims, axis=1)
            cos_prev, near_prev = sims[np.arange(len(rows)), best], np.asarray(selected)[best]
        acc_rows: list[int] = []
        out = (selected, removed, acc_rows)
        got = _resolve_block(rows, near_prev, cos_prev, x @ x.T, tau, room - m, out)
        acc[m : m + got] = x[acc_rows]
    pairs = np.asarray(removed, np.int64).reshape(-1, 2)
    return np.asarray(selected, np.int64), pairs


# ---------------------------------------------------------------- Superfiltering.D


SIM_ONE = 1 << 24  # similarities are fixed point: sim = round(SIM_ONE * (1 + cos)/2) / SIM_ONE


def _gain(row: np.ndarray, cur: np.ndarray) -> int:
    """SIM_ONE * (f(S + {j}) - f(S)) = sum_i max(sim(i, j) - cur_i, 0), cur_i = max_S sim(i, s).

    Exact integer arithmetic: equal gains are equal (two-item clusters tie exactly by
    symmetry), gains never grow as cur grows, and the lazy greedy is exactly the plain one."""
    return int(np.maximum(row - cur, 0).sum(dtype=np.int64))


def _similarity_matrix(e: np.ndarray, norms: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int32 [P, P], exactly symmetric, diagonal SIM_ONE: round(SIM_ONE * (1 + cos)/2).

    Built in row blocks from the upper triangle (each block: [B, D] @ [D, P - a]), so there
    is no [P, P] float temporary and sim(i, j) == sim(j, i) bit for bit."""
    x = _unit(e, norms, rows)
    p = len(rows)
    sim = np.empty((p, p), np.int32)
    for a in range(0, p, _ROWS_PER_BLOCK):
        q = np.clip((1.0 + x[a : a + _ROWS_PER_BLOCK] @ x[a:].T) / 2.0, 0.0, 1.0)
        q = np.rint(q * SIM_ONE).astype(np.int32)
        b = len(q)
        low = np.tril_indices(b, -1)
        q[:, :b][low] = q[:, :b].T[low]  # the diagonal block from its upper triangle
        np.fill_diagonal(q[:, :b], SIM_ONE)
        sim[a : a + b, a:] = q
        sim[a + b :, a : a + b] = q[:, b:].T
    return sim


def _lazy_greedy(sim: np.ndarray, k: int) -> list[int]:
    """Greedy facility location on sim [P, P] (row j = sim(., j)), rows ranked best first.

    Lazy evaluation (Minoux): a heap of (-upper bound on the gain, rank); a popped bound that
    was computed at this step is the true maximum (f is submodular, so gains only shrink),
    and equal gains go to the lower rank (the better score), exactly as the plain greedy."""
    cur = np.zeros(len(sim), np.int64)
    heap = [(-_gain(sim[j], cur), j, 0) for j in range(len(sim))]
    heapq.heapify(heap)
    chosen = []
    for step in range(k):
        while True:
            _, j, fresh_at = heapq.heappop(heap)
            if fresh_at == step:
                break
            heapq.heappush(heap, (-_gain(sim[j], cur), j, step))
        chosen.append(j)
        np.maximum(cur, sim[j], out=cur)
    return chosen


def facility_location_select(
    embeddings: np.ndarray,
    scores: np.ndarray,
    k: int,
    pool: int | None = None,
    *,
    order: Any = None,
    max_bytes: int = 4 * 2**30,
) -> np.ndarray:
    """Superfiltering.D-style selection (arXiv 2402.00530): indices int64 [min(k, pool)].

    Pool = the first `pool` items of the ranking (default min(N, 3k), our choice: enough room
    for diversity without diluting the score). The ranking is `order` if given (distinct
    indices best first, e.g. `rank_order` filtered by `near_duplicates`), else scores
    descending, ties by lower index. Greedy maximisation of the facility-location function
    f(S) = sum_{i in pool} max_{j in S} sim(i, j), f({}) = 0, with
    sim = round(2^24 * (1 + cos)/2) / 2^24 in [0, 1] (fixed point, so gains are exact):
    each step adds argmax_j f(S + {j}) - f(S), equal gains to the better-ranked item; lazy
    greedy, exactly the plain greedy. Returns indices into the full array, in selection order.
    Memory: the pool's int32 [P, P] similarity matrix, built blockwise; ValueError if
    4 * P^2 bytes > max_bytes (default 4 GiB: P <= 32768). Time O(P^2 D + k' P^2) worst case,
    k' = gain evaluations per step (lazy: usually a few).
    """
    e, norms = _row_norms(embeddings)
    n = len(e)
    s = _check_scores(scores, n)
    k = _check_int("k", k, 0)
    ranking = np.argsort(-s, kind="stable") if order is None else _check_order(order, n, False)
    size = min(len(ranking), 3 * k) if pool is None else _check_int("pool", pool, 1)
    if size < min(k, len(ranking)):
        raise ValueError(f"pool={size} is smaller than k={k}; the pool must hold the selection")
    rows = ranking[:size]
    need = len(rows) ** 2 * 4
    if need > max_bytes:
        raise ValueError(
            f"pool of {len(rows)} needs a {len(rows)}x{len(rows)} int32 similarity matrix of "
            f"{need} bytes > max_bytes={max_bytes}; lower pool or raise max_bytes"
        )
    if k == 0 or not len(rows):
        return np.empty(0, np.int64)
    sim = _similarity_matrix(e, norms, rows)
    return rows[_lazy_greedy(sim, min(k, len(rows)))].astype(np.int64)


# ---------------------------------------------------------------- manifest entries


@dataclass(frozen=True)
class DiversityResult:
    """What a diversity step did, for the selection manifest.

    selected: int64 [s] items it kept/selected, in order. removed: int64 [R, 2] rows
    (removed index, kept index that made it redundant). n_considered: items it looked at."""

    method: str
    params: dict[str, Any]
    n_considered: int
    selected: np.ndarray
    removed: np.ndarray = field(repr=False)

    def manifest(self, max_pairs: int = MAX_LISTED_PAIRS) -> dict[str, Any]:
        """{"method", **params, "n_considered", "n_selected", "n_removed", "removed":
        first `max_pairs` [removed, kept] pairs, "removed_truncated": bool}; JSON-ready."""
        pairs = self.removed[:max_pairs].tolist()
        return {
            "method": self.method,
            **self.params,
            "n_considered": int(self.n_considered),
            "n_selected": int(len(self.selected)),
            "n_removed": int(len(self.removed)),
            "removed": pairs,
            "removed_truncated": len(self.removed) > len(pairs),
        }


def minhash_dedupe(
    texts: Sequence[str],
    order: Any,
    threshold: float = 0.8,
    *,
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 0,
    bands: int | None = None,
) -> DiversityResult:
    """`minhash_signatures` + `near_duplicates`; selected = kept items in `order` order."""
    sig = minhash_signatures(texts, num_perm=num_perm, ngram=ngram, seed=seed)
    keep, dup = near_duplicates(sig, order, threshold, bands)
    o = np.asarray(order, np.int64)
    gone = o[~keep[o]]
    b = choose_bands(num_perm, float(threshold)) if bands is None else bands
    params = {"threshold": float(threshold), "num_perm": num_perm, "ngram": ngram}
    params |= {"seed": seed, "bands": int(b)}
    removed = np.stack([gone, dup[gone]], axis=1) if len(gone) else np.empty((0, 2), np.int64)
    return DiversityResult("minhash", params, len(o), o[keep[o]], removed)


def threshold_diversity(
    embeddings: np.ndarray, order: Any, k: int, min_distance: float
) -> DiversityResult:
    """`threshold_select` as a manifest entry; n_considered = items examined before stopping."""
    selected, removed = threshold_select(embeddings, order, k, min_distance)
    params = {"min_distance": float(min_distance), "k": int(k)}
    return DiversityResult("threshold", params, len(selected) + len(removed), selected, removed)


def facility_location_diversity(
    embeddings: np.ndarray, scores: np.ndarray, k: int, pool: int | None = None, **kwargs: Any
) -> DiversityResult:
    """`facility_location_select` as a manifest entry: removed = pool items not selected,
    each with the selected item that covers it best (max cosine; ties: selected first)."""
    selected = facility_location_select(embeddings, scores, k, pool, **kwargs)
    s = np.asarray(scores, np.float64)
    order = kwargs.get("order")
    ranking = np.argsort(-s, kind="stable") if order is None else np.asarray(order, np.int64)
    size = min(len(ranking), 3 * int(k) if pool is None else int(pool))
    rest = ranking[:size][~np.isin(ranking[:size], selected)]
    cover = np.full(len(rest), -1, np.int64)
    if len(selected) and len(rest):
        e, norms = _row_norms(embeddings)
        xs = _unit(e, norms, selected)
        for a in range(0, len(rest), _ROWS_PER_BLOCK):
            blk = rest[a : a + _ROWS_PER_BLOCK]
            cover[a : a + len(blk)] = selected[np.argmax(_unit(e, norms, blk) @ xs.T, axis=1)]
    params = {"k": int(k), "pool": int(size), "similarity": "(1+cos)/2, 24-bit fixed point"}
    return DiversityResult("facility_location", params, size, selected, np.stack([rest, cover], 1))


# The `davir select --diversity` steps: name -> (kind, {option: (type, default)}). A `dedupe`
# step removes items and keeps the ranking; a `pick` step chooses the budget from it (last).
DIVERSITY_STEPS: dict[str, tuple[str, dict[str, tuple[type, Any]]]] = {
    "minhash": ("dedupe", {"threshold": (float, 0.8), "num_perm": (int, 128), "ngram": (int, 5)}),
    "threshold": ("pick", {"min_distance": (float, 0.1)}),
    "facility": ("pick", {"pool": (int, None)}),
}


@dataclass(frozen=True)
class DiversityStep:
    """One `--diversity` step: `method` of `DIVERSITY_STEPS` and its options."""

    method: str
    options: dict[str, Any]

    @property
    def kind(self) -> str:
        return DIVERSITY_STEPS[self.method][0]

    @classmethod
    def parse(cls, text: str) -> DiversityStep:
        """`METHOD[:key=value,...]`, e.g. `minhash`, `threshold:min_distance=0.1`,
        `facility:pool=3000`; unknown methods or keys, and bad values, are errors."""
        method, _, rest = text.strip().partition(":")
        if method not in DIVERSITY_STEPS:
            known = ", ".join(DIVERSITY_STEPS)
            raise ValueError(f"bad diversity step {text!r}: {method!r} is not one of {known}")
        allowed = DIVERSITY_STEPS[method][1]
        options = {k: default for k, (_, default) in allowed.items()}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in allowed:
                raise ValueError(
                    f"bad diversity step {text!r}: {item!r}; {method} takes "
                    + ", ".join(f"{k}=VALUE" for k in allowed)
                )
            try:
                options[key] = allowed[key][0](value)
            except ValueError:
                raise ValueError(f"bad diversity step {text!r}: {key}={value!r}") from None
        return cls(method, options)

    def spec(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items() if v is not None)
        return self.method + (f":{opts}" if opts else "")
