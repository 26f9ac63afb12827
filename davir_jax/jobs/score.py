"""The DavIR scoring job: every example's response NLL under a base and a reference model.

    davir score --data FILE --template plain --base SRC --reference SRC --out DIR

One pass over a tokenized data set (`davir_jax.data`); each fixed-shape batch goes through both
models (or, with `scoring.resident=sequential`, all batches through the base, then all through the
reference, for when both do not fit), so both see the same token ids and masks. The per-example
summed NLL is `davir_jax.core.losses.example_nll`, the same function the trainers use.

Output, resumable at any moment:
    DIR/run.json                          what this run is (models, data, tokenizer, batching):
                                          a rerun with anything else refuses to mix outputs
    DIR/shards/{base,reference}/p{P}-s{S}.parquet
                                          rows `example_id, index, n_tokens, nll` of shard S
                                          (`shard_batches` batches) of process P, atomic
    DIR/scores.parquet                    the merged table (process 0, after all shards):
                                          example_id, source, row, content_hash, n_tokens,
                                          nll_base, nll_ref, record
    DIR/manifest.json                     fingerprints, config, skip counts by reason, timings
    DIR/diagnostics.{md,json} + PNGs      length correlations of every score

Killed at any point (even SIGKILL) and run again, the job continues from the first shard that
some process has not finished; all processes agree on that point so their collective steps stay
in lockstep. The final table equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from davir_jax.config import Config
from davir_jax.core.fingerprints import tokenizer_fingerprint
from davir_jax.core.io import progress_bar, write_atomic, write_json
from davir_jax.core.runs import batching_identity, check_batch_rows, claim_run_dir
from davir_jax.core.schema import to_dict
from davir_jax.core.scores import MANIFEST_FILE, SCORES_FILE
from davir_jax.core.sharding import mesh_from_config
from davir_jax.data.batching import Batch
from davir_jax.data.dataset import prepare
from davir_jax.data.readers import PAIR_FORMATS, iter_rows, resolve_format
from davir_jax.data.skips import SkipLog
from davir_jax.engine.nll import NonFiniteLossError, name_examples, nonfinite_examples, stream_nll
from davir_jax.engine.preflight import checked
from davir_jax.models.decoder import Decoder
from davir_jax.models.loading import load_model, load_tokenizer_for, model_fingerprint
from davir_jax.reports.diagnostics import write_diagnostics

if TYPE_CHECKING:  # the data layer (tensorflow-datasets) loads only when a job runs
    from davir_jax.data.dataset import TokenizedData

MODELS = ("base", "reference")


# -- non-finite values ---------------------------------------------------------------------


# -- the jitted step -----------------------------------------------------------------------


# -- the job -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shard:
    """Rows of one output shard for one model, collected batch by batch."""

    ids: list[str] = dataclasses.field(default_factory=list)
    index: list[int] = dataclasses.field(default_factory=list)
    n_tokens: list[int] = dataclasses.field(default_factory=list)
    nll: list[float] = dataclasses.field(default_factory=list)

    def add(self, data: TokenizedData, batch: Batch, nll: np.ndarray, cnt: np.ndarray) -> None:
        sel = batch.example_index >= 0
        for i, v, c in zip(batch.example_index[sel], nll[sel], cnt[sel]):
            self.ids.append(data.example_ids[i])
            self.index.append(int(data.rows[i]))
            self.n_tokens.append(int(round(float(c))))
            self.nll.append(float(v))

    def write(self, path: Path) -> None:
        table = pa.table(
            {
                "example_id": pa.array(self.ids, pa.string()),
                "index": pa.array(self.index, pa.int64()),
                "n_tokens": pa.array(self.n_tokens, pa.int64()),
                "nll": pa.array(self.nll, pa.float64()),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_atomic(path, sink.getvalue().to_pybytes())


def _shard_path(out: Path, model: str, process: int, shard: int) -> Path:
    return out / "shards" / model / f"p{process:05d}-s{shard:06d}.parquet"


def _agree_min(value: int) -> int:
    """The minimum of `value` over all processes (every process gets the same answer)."""
    if jax.process_count() == 1:
        return value

    return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def _agree_max(value: int) -> int:
    """The maximum of `value` over all processes (every process gets the same answer)."""
    if jax.process_count() == 1:
        return value

    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def _refuse_nonfinite(bad: list[str], shard: int) -> None:
    where = name_examples(bad) if bad else "examples of another process (see its log)"
    raise NonFiniteLossError(
        f"non-finite NLL in shard {shard} for {where}; the shard was not written (check the "
        "model's weights and that its vocabulary covers the tokenizer)"
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def run_identity(cfg: Config, data: TokenizedData, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What must be equal for two runs' shards to be mixed."""
    return {
        "data": data.fields,
        "models": fingerprints,
        "dtype": [cfg.model.dtype, cfg.model.compute_dtype or cfg.model.dtype],
        "batching": {**batching_identity(cfg), "shard_batches": cfg.scoring.shard_batches},
        "resident": cfg.scoring.resident,
        "process_count": jax.process_count(),
    }


def _load(cfg: Config, source: str, mesh: Mesh) -> Decoder:
    m = cfg.model
    return load_model(source, m.dtype, mesh, **m.run_options())


def scored_models(cfg: Config) -> tuple[str, ...]:
    """The models this run scores: both, or the reference alone when no base is given (the
    reference log-probs of preference pairs for DPO)."""
    return tuple(m for m in MODELS if getattr(cfg.scoring, m) is not None)


def _passes(cfg: Config) -> list[tuple[str, ...]]:
    models = scored_models(cfg)
    return [models] if cfg.scoring.resident == "both" else [(m,) for m in models]


@checked("score")  # preflight: every input and output checked, the output locked
def score(cfg: Config, progress: bool = True, mesh: Mesh | None = None) -> Path:
    """Run (or resume) the scoring job described by `cfg`; returns the output directory.

    `mesh` defaults to `cfg.mesh` over all devices.
    """
    sc = cfg.scoring
    missing = [k for k in ("reference", "out") if getattr(sc, k) is None]
    if missing or cfg.data.path is None:
        names = [f"scoring.{k}" for k in missing] + (["data.path"] if cfg.data.path is None else [])
        raise ValueError(f"davir score needs {', '.join(names)}")
    t_start = time.time()
    if mesh is None:
        mesh = mesh_from_config(cfg.mesh)  # first: it may set the CPU device count
    pi, pc = jax.process_index(), jax.process_count()
    check_batch_rows(cfg, mesh)
    tok, fingerprints = _tokenizer(cfg)
    # Preference files: both responses of every pair are scored (ids ".../chosen", ".../rejected").
    pairs = resolve_format(cfg.data.path, cfg.data.format) in PAIR_FORMATS
    data = prepare(cfg.data, tok, pi, pc, progress=progress and pi == 0, pairs=pairs)
    out = Path(sc.out)
    identity = run_identity(cfg, data, fingerprints)
    claim_run_dir(out, identity, sc.overwrite, "scoring run")
    plans = data.plans(shuffle=False)
    n_shards = math.ceil(len(plans) / sc.shard_batches)
    timings: dict[str, float] = {}
    for models in _passes(cfg):
        _score_pass(cfg, out, data, plans, models, mesh, timings, progress)
    _barrier(f"davir score shards {out}")
    if pi == 0:
        _merge(cfg, out, data, identity, n_shards, pc, timings, t_start)
    _barrier(f"davir score merged {out}")
    return out


def _tokenizer(cfg: Config) -> tuple[Any, dict[str, str]]:
    """The tokenizer both models are scored with, and the fingerprints of the models and it."""
    sc = cfg.scoring
    # The tokenizer's ids must fit both models' vocabularies (else every NLL is NaN).
    tok = load_tokenizer_for(sc.tokenizer or sc.base or sc.reference, (sc.base, sc.reference))
    fingerprints = {m: model_fingerprint(getattr(sc, m)) for m in scored_models(cfg)}
    fingerprints["tokenizer"] = tokenizer_fingerprint(tok)
    if sc.tokenizer is None and sc.base is not None:
        try:
            ref_tok = load_tokenizer_for(sc.reference)
        except (OSError, ValueError):
            ref_tok = None  # a reference without its own tokenizer uses the base's
        if ref_tok is not None and tokenizer_fingerprint(ref_tok) != fingerprints["tokenizer"]:
            raise ValueError(
                f"the base ({sc.base}) and reference ({sc.reference}) tokenizers differ; "
                "scores would compare different token sequences"
            )
    return tok, fingerprints


def _score_pass(
    cfg: Config,
    out: Path,
    data: TokenizedData,
    plans: list,
    models: tuple[str, ...],
    mesh: Mesh,
    timings: dict[str, float],
    progress: bool,
) -> None:
    """Score the shards this process has not written yet with `models` resident together,
    writing one Parquet shard per model and `shard_batches` batches."""
    sc, pi, pc = cfg.scoring, jax.process_index(), jax.process_count()
    k = sc.shard_batches
    n_shards = math.ceil(len(plans) / k)
    for m in models:
        (out / "shards" / m).mkdir(parents=True, exist_ok=True)
        for stale in (out / "shards" / m).glob(f".p{pi:05d}-*.tmp-*"):
            stale.unlink(missing_ok=True)  # a write cut short by a kill
    # The first shard some process has not finished: everyone resumes there (lockstep).
    done = (all(_shard_path(out, m, pi, s).is_file() for m in models) for s in range(n_shards))
    first = _agree_min(next((s for s, d in enumerate(done) if not d), n_shards))
    if first == n_shards:
        return
    key = "+".join(models)
    t0 = time.time()
    loaded = {m: _load(cfg, getattr(sc, m), mesh) for m in models}
    timings["load_" + key] = time.time() - t0
    t0 = time.time()
    n_ex = n_tok = 0
    bar = progress_bar(len(plans), "score", "batch", progress and pi == 0, first * k)
    for s in range(first, n_shards):
        shards = {m: _Shard() for m in models}
        batches = (b for _, b in data.batches(plans[: (s + 1) * k], pi, pc, start=s * k))
        bad: list[str] = []
        for batch, nlls in stream_nll(loaded, batches, data.num_segments, sc.chunk):
            for m in models:
                # Checked before the shard is written: a NaN score must never be stored.
                bad += [
                    f"{i} ({m})" for i in nonfinite_examples(batch, nlls[m][0], data.example_ids)
                ]
                if bad and pc == 1:
                    _refuse_nonfinite(bad, s)
                shards[m].add(data, batch, *nlls[m])
            n_ex += int((batch.example_index >= 0).sum())
            n_tok += int((batch.segment_ids > 0).sum())
            bar.update(1)
            dt = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{n_ex / dt:,.1f} ex/s {n_tok / dt:,.0f} tok/s", refresh=False)
        if _agree_max(len(bad)):  # every process stops at the same shard
            _refuse_nonfinite(bad, s)
        for m in models:
            shards[m].write(_shard_path(out, m, pi, s))
    bar.close()
    timings["score_" + key] = time.time() - t0
    timings["tokens_per_s_" + key] = n_tok * pc / max(time.time() - t0, 1e-9)


def _read_model_shards(out: Path, model: str, n_shards: int, pc: int) -> pa.Table:
    tables = [
        pq.read_table(_shard_path(out, model, p, s)) for p in range(pc) for s in range(n_shards)
    ]
    return pa.concat_tables(tables)


def _source_rows(data: TokenizedData, wanted: set[int]) -> dict[int, str]:
    """Row index -> the source row's text, for the rows that were scored."""
    out = {}
    for raw in iter_rows(data.cfg.path, SkipLog()):
        if raw.row in wanted:
            out[raw.row] = raw.text
    return out


def _merge(
    cfg: Config,
    out: Path,
    data: TokenizedData,
    identity: dict[str, Any],
    n_shards: int,
    pc: int,
    timings: dict[str, float],
    t_start: float,
) -> None:
    """Join every process's shards into `scores.parquet` and its manifest, refusing missing,
    duplicated or non-finite examples (never a complete table that is not whole)."""
    cols = {m: _checked_shards(out, m, data, n_shards, pc) for m in scored_models(cfg)}
    ref, base = cols["reference"], cols.get("base")
    if base is not None and (
        base.column("example_id").to_pylist() != ref.column("example_id").to_pylist()
    ):
        raise RuntimeError(f"{out}: base and reference shards hold different examples")
    table = _scores_table(data, ref, base)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(out / SCORES_FILE, sink.getvalue().to_pybytes())
    manifest = {
        "kind": "davir-scores",
        "complete": True,
        "n_examples": table.num_rows,
        "n_response_tokens": int(np.sum(table.column("n_tokens").to_numpy())),
        "data": {
            "path": str(Path(data.cfg.path).resolve()),
            "format": data.fields["format"],
            "name": data.source,
            "sha256": data.fields["data_sha256"],
        },
        "template": data.cfg.template,
        "fingerprints": {**identity["models"], "data": data.fields["data_sha256"]},
        "models": {"base": cfg.scoring.base, "reference": cfg.scoring.reference},
        "pairs": data.fields.get("sides") == "both",
        "skipped": dict(data.log.skipped),
        "warnings": dict(data.log.warnings),
        "skip_locations": data.log.to_dict()["where"],
        "config": to_dict(cfg),
        "run": identity,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "wall_s": round(time.time() - t_start, 3),
        # Where this last (or only) session ran. Scores do not depend on it beyond float
        # rounding (~1e-6 relative), so a resume on another device count may continue the run.
        "devices": {
            "platform": jax.devices()[0].platform,
            "count": jax.device_count(),
            "processes": jax.process_count(),
        },
    }
    write_json(out / MANIFEST_FILE, manifest, sort_keys=True)
    if cfg.scoring.diagnostics and base is not None:
        write_diagnostics(out, echo=False)


def _checked_shards(out: Path, m: str, data: TokenizedData, n_shards: int, pc: int) -> pa.Table:
    """One model's shards as one table sorted by (row, id) (the two responses of a preference
    pair share a row), holding every example once with a finite NLL."""
    t = _read_model_shards(out, m, n_shards, pc).sort_by(
        [("index", "ascending"), ("example_id", "ascending")]
    )
    ids = t.column("example_id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RuntimeError(f"{out}: example {dup} appears twice in the {m} shards")
    if sorted(ids) != sorted(data.example_ids):
        missing = sorted(set(data.example_ids) - set(ids))[:5]
        raise RuntimeError(f"{out}: the {m} shards miss examples, e.g. {missing}")
    nll = t.column("nll").to_numpy()
    if not np.isfinite(nll).all():  # never a complete table with NaN (shards of an old run)
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(nll))]
        raise NonFiniteLossError(
            f"{out}: the {m} shards hold non-finite NLLs for {name_examples(bad)}; no table "
            "was written (rescore with --overwrite)"
        )
    return t


def _scores_table(data: TokenizedData, ref: pa.Table, base: pa.Table | None) -> pa.Table:
    rows = ref.column("index").to_pylist()
    text = _source_rows(data, set(rows))
    records = [text[r] for r in rows]
    nulls = pa.nulls(len(rows), pa.float64())
    return pa.table(
        {
            "example_id": ref.column("example_id"),
            "source": pa.array([data.source] * len(rows), pa.string()),
            "row": ref.column("index"),
            "content_hash": pa.array(
                [hashlib.sha256(t.encode()).hexdigest()[:16] for t in records], pa.string()
            ),
            "n_tokens": ref.column("n_tokens"),
            "nll_base": base.column("nll") if base is not None else nulls,
            "nll_ref": ref.column("nll"),
            # Summed log-probs, for DPO (log p_ref(y|x) = -nll_ref).
            "logp_ref": pa.array(-ref.column("nll").to_numpy(), pa.float64()),
            "record": pa.array(records, pa.string()),
        }
    )


def iter_scores(out: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a finished scoring run's table, as dicts."""
    yield from pq.read_table(Path(out) / SCORES_FILE).to_pylist()
