"""A scoring job's output written by hand, for the tests of selection and of plugin scores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_scores_dir(
    d: Path, source: str, n: int, seed: int, records: list[str] | None = None, **columns
) -> dict:
    """A scoring job's output in `d`: scores.parquet + manifest.json for `n` examples of
    `source` with random lengths and NLLs, rounded so that DavIR ties occur (exercising the id
    tie-break); returns the columns (`ids`, `lb`, `lr`, `t`), records and manifest. `columns`:
    more float64 columns (e.g. `nll_base_alone`)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 200, n)
    lb = np.round(t * rng.uniform(0.5, 3.0, n), 1) + 0.5
    lr = np.round(lb * rng.choice([0.5, 0.75, 0.9], n), 3)
    if records is None:
        records = [
            json.dumps({"instruction": f"q{source}{i}", "output": "a" * int(t[i])})
            for i in range(n)
        ]
    ids = [f"{source}:{i}" for i in range(n)]
    d.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "example_id": ids,
                "source": [source] * n,
                "row": pa.array(range(n), pa.int64()),
                "content_hash": [hashlib.sha256(r.encode()).hexdigest() for r in records],
                "n_tokens": pa.array(t, pa.int64()),
                "nll_base": lb,
                "nll_ref": lr,
                "record": records,
                **{k: pa.array(v, pa.float64()) for k, v in columns.items()},
            }
        ),
        d / "scores.parquet",
    )
    manifest = {
        "data": {"path": f"/data/{source}.jsonl", "format": "jsonl", "sha256": "ab" * 32},
        "template": "alpaca",
        "fingerprints": {"base": f"base-{seed}", "ref": f"ref-{seed}"},
        "skipped": {"malformed_json": 1},
        "other": {"opaque": True},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return {
        "ids": np.array(ids),
        "lb": lb,
        "lr": lr,
        "t": t,
        "records": records,
        "manifest": manifest,
    }
