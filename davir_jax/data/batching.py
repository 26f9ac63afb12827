"""Token batches of a fixed, small set of shapes: length-bucketed padding or packing.

A *plan* is made once from the example lengths alone, the same on every process (it is a pure
function of the lengths and the seed), as a list of global `BatchPlan`s. Each process then takes its
own contiguous slice of every batch's rows (`local_rows`), so every process runs the same number of
steps; the last batch is completed with empty, zero-weight rows.

* `padded_plan`: one example per row; rows are grouped by the smallest bucket width that holds
  them (`bucket_widths`: a handful of sizes), so compiled shapes are few and padding is small.
* `packed_plan`: several examples per fixed-length row, placed best-fit-decreasing (each example,
  longest first, goes to the open row with the least room that still fits it), with segment ids
  and per-segment positions so attention and positions restart for every example.

`assemble` turns a plan's rows into a `Batch` of NumPy arrays; `segment` ids count from 1 in each
row and 0 marks padding, which the model and the losses understand.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """One global batch: `rows[r]` holds the example indices packed into row r (empty = filler)."""

    width: int
    rows: tuple[tuple[int, ...], ...]


@dataclasses.dataclass
class Batch:
    """Host arrays of one batch. Rows `[R, W]`, segments `[R, S]`.

    `loss_mask[r, t]` = token t is a response token (it is predicted from position t-1);
    `example_index[r, s]` = the example in segment s+1 of row r, or -1; `weights[r, s]` = its
    weight (0 for filler).
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    example_index: np.ndarray
    weights: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def bucket_widths(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Bucket widths: doubling from `smallest` up to `max_len` (the last one is `max_len`)."""
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    out, w = [], smallest
    while w < max_len:
        out.append(w)
        w *= 2
    out.append(max_len)
    return tuple(out)


def _check_lengths(lengths: np.ndarray, limit: int, what: str) -> np.ndarray:
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be one-dimensional")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > limit):
        i = int(np.argmax(lengths > limit)) if lengths.max() > limit else int(np.argmin(lengths))
        raise ValueError(f"example {i} has length {lengths[i]}, outside 1..{limit} ({what})")
    return lengths


def _group(rows: list[tuple[int, ...]], width: int, per_batch: int) -> list[BatchPlan]:
    out = []
    for i in range(0, len(rows), per_batch):
        chunk = rows[i : i + per_batch]
        chunk += [()] * (per_batch - len(chunk))  # zero-weight filler rows
        out.append(BatchPlan(width, tuple(chunk)))
    return out


def padded_plan(
    lengths: Sequence[int],
    rows_per_batch: int,
    widths: Sequence[int],
    shuffle: bool = False,
    seed: int = 0,
) -> list[BatchPlan]:
    """Length-bucketed padded batches, one example per row.

    Examples go to the smallest width that holds them; a bucket's leftover rows (fewer than a
    batch) move up to the next width, so only the very last batch has filler rows. With
    `shuffle`, examples within a bucket and the order of batches are permuted with `seed`.
    """
    widths = sorted(set(int(w) for w in widths))
    lengths = _check_lengths(lengths, widths[-1], f"the largest bucket width is {widths[-1]}")
    rng = np.random.default_rng(seed)
    bucket = np.searchsorted(np.asarray(widths), lengths, side="left")
    plans: list[BatchPlan] = []
    carry: list[int] = []
    for b, w in enumerate(widths):
        idx = np.flatnonzero(bucket == b)
        idx = rng.permutation(idx) if shuffle else idx
        members = carry + idx.tolist()
        full = len(members) // rows_per_batch * rows_per_batch
        if b == len(widths) - 1:
            full = len(members)
        plans += _group([(i,) for i in members[:full]], w, rows_per_batch)
        carry = members[full:]
    if shuffle:
        plans = [plans[i] for i in rng.permutation(len(plans))]
    return plans


def pack_bfd(lengths: Sequence[int], row_len: int, max_segments: int) -> list[tuple[int, ...]]:
    """Best-fit-decreasing bin packing: lists of example indices per row.

    Longest first (ties by index, so the result is deterministic), each example goes to the open
    row whose free space is the smallest that still fits it; a row with `max_segments` examples
    is closed. Open rows are indexed by free space (at most `row_len + 1` distinct values), so a
    placement costs O(log row_len) plus the list maintenance.
    """
    lengths = _check_lengths(lengths, row_len, f"the packed row length is {row_len}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    rows: list[list[int]] = []
    free: list[int] = []  # free space per row
    by_free: dict[int, list[int]] = {}  # free space -> open rows with that much room
    keys: list[int] = []  # sorted free-space values that have open rows
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(keys, n)
        if k < len(keys):
            space = keys[k]
            r = by_free[space].pop()
            if not by_free[space]:
                del by_free[space]
                keys.pop(k)
        else:
            r = len(rows)
            rows.append([])
            free.append(row_len)
            space = row_len
        rows[r].append(i)
        free[r] = space - n
        if len(rows[r]) < max_segments and free[r] > 0:
            if free[r] not in by_free:
                by_free[free[r]] = []
                bisect.insort(keys, free[r])
            by_free[free[r]].append(r)
    return [tuple(r) for r in rows]


def packed_plan(
    lengths: Sequence[int],
    rows_per_batch: int,
    row_len: int,
    max_segments: int,
    shuffle: bool = False,
    seed: int = 0,
) -> list[BatchPlan]:
    """Packed batches of fixed-length rows (best-fit decreasing); with `shuffle`, the rows are
    permuted with `seed` before they are grouped into batches."""
    rows = pack_bfd(lengths, row_len, max_segments)
    if shuffle:
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    return _group(rows, row_len, rows_per_batch)


def plan_efficiency(plans: Sequence[BatchPlan], lengths: Sequence[int]) -> float:
    """Real tokens / row tokens over all batches (filler rows count as waste)."""
    lengths = np.asarray(lengths)
    total = sum(p.width * len(p.rows) for p in plans)
    real = sum(int(lengths[list(r)].sum()) for p in plans for r in p.rows if r)
    return real / total if total else 0.0


def local_rows(
    plan: BatchPlan, process_index: int, process_count: int
) -> tuple[tuple[int, ...], ...]:
    """This process's contiguous slice of a global batch's rows."""
    n = len(plan.rows)
    if n % process_count:
        raise ValueError(f"{n} rows per batch do not split evenly over {process_count} processes")
    per = n // process_count
    return plan.rows[process_index * per : (process_index + 1) * per]


def assemble(
    rows: Sequence[Sequence[int]],
    width: int,
    max_segments: int,
    get: Callable[[list[int]], Sequence[tuple[np.ndarray, np.ndarray]]],
    weights: np.ndarray | None = None,
) -> Batch:
    """Fill a `Batch` from rows of example indices.

    `get(indices)` returns `(input_ids, loss_mask)` per index (from the tokenized store);
    `weights[i]` (default 1) is example i's weight.
    """
    r_n = len(rows)
    ids = np.zeros((r_n, width), np.int32)
    seg = np.zeros((r_n, width), np.int32)
    pos = np.zeros((r_n, width), np.int32)
    mask = np.zeros((r_n, width), np.int32)
    ex = np.full((r_n, max_segments), -1, np.int32)
    w = np.zeros((r_n, max_segments), np.float32)
    flat = [i for row in rows for i in row]
    fetched = dict(zip(flat, get(flat))) if flat else {}
    for r, row in enumerate(rows):
        if len(row) > max_segments:
            raise ValueError(f"row {r} holds {len(row)} examples > max_segments={max_segments}")
        t = 0
        for s, i in enumerate(row):
            x, m = fetched[i]
            n = len(x)
            if t + n > width:
                raise ValueError(f"row {r}: examples {list(row)} need more than {width} tokens")
            ids[r, t : t + n] = x
            seg[r, t : t + n] = s + 1
            pos[r, t : t + n] = np.arange(n)
            mask[r, t : t + n] = m
            ex[r, s] = i
            w[r, s] = 1.0 if weights is None else weights[i]
            t += n
    return Batch(ids, seg, pos, mask, ex, w)
