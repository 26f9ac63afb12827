"""The DavIR scoring job: every example's response NLL under a base and a reference model.

    davir score --data FILE --template plain --base SRC --reference SRC --out DIR
                [--proxy SRC] [--scoring.ifd=[base,reference]]

One pass over a tokenized data set (`davir_jax.data`); each fixed-shape batch goes through both
models (or, with `scoring.resident=sequential`, all batches through the base, then all through the
reference, for when both do not fit), so both see the same token ids and masks. The per-example
summed NLL is `davir_jax.core.losses.example_nll`, the same function the trainers use. For IFD
(`scoring.ifd`, and a `scoring.proxy` for Superfiltering) a second view of the same examples,
each response after one start token instead of its prompt (`ResponseAlone`), is scored the same
way by the models that need it, while they are loaded.

Output, resumable at any moment:
    DIR/run.json                          what this run is (models, data, tokenizer, batching):
                                          a rerun with anything else refuses to mix outputs
    DIR/shards/{base,reference,proxy}[_alone]/p{P}-s{S}.parquet
                                          rows `example_id, index, n_tokens, nll` of shard S
                                          (`shard_batches` batches) of process P, atomic
    DIR/scores.parquet                    the merged table (process 0, after all shards):
                                          example_id, source, row, content_hash, n_tokens,
                                          nll_base, nll_ref, record, and the IFD columns
                                          nll_proxy, nll_{base,ref,proxy}_alone when scored
    DIR/embeddings.npy                    with `scoring.embed`: float32 [N, D] mean-pooled
                                          response hidden states, rows as scores.parquet
    DIR/manifest.json                     fingerprints, config, skip counts by reason, timings
    DIR/diagnostics.{md,json} + PNGs      length correlations of every score

Killed at any point (even SIGKILL) and run again, the job continues from the first shard that
some process has not finished; all processes agree on that point so their collective steps stay
in lockstep. The final table equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
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
from davir_jax.core import storage
from davir_jax.core.fingerprints import tokenizer_fingerprint
from davir_jax.core.io import progress_bar, write_atomic, write_json
from davir_jax.core.runs import batching_identity, check_batch_rows, claim_run_dir
from davir_jax.core.schema import to_dict
from davir_jax.core.scores import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    OPTIONAL_NLL_COLUMNS,
    SCORES_FILE,
)
from davir_jax.core.sharding import mesh_from_config
from davir_jax.data.batching import Batch
from davir_jax.data.dataset import ResponseAlone, prepare, start_token
from davir_jax.data.readers import PAIR_FORMATS, iter_rows, resolve_format
from davir_jax.data.skips import SkipLog
from davir_jax.engine.nll import NonFiniteLossError, name_examples, nonfinite_examples, stream_nll
from davir_jax.engine.preflight import checked
from davir_jax.models.decoder import Decoder
from davir_jax.models.loading import load_model, load_tokenizer_for, model_fingerprint
from davir_jax.reports.diagnostics import write_diagnostics

if TYPE_CHECKING:  # the data layer (tensorflow-datasets) loads only when a job runs
    from davir_jax.data.dataset import TokenizedData

MODELS = ("base", "reference", "proxy")
# The scores table's NLL column of each model (`core.scores.NLL_COLUMNS`).
NLL_COLUMN = {"base": "nll_base", "reference": "nll_ref", "proxy": "nll_proxy"}
ALONE = "_alone"  # suffix of a model's response-alone shards and column


@dataclasses.dataclass
class _Shard:
    """Rows of one output shard for one model, collected batch by batch."""

    ids: list[str] = dataclasses.field(default_factory=list)
    index: list[int] = dataclasses.field(default_factory=list)
    n_tokens: list[int] = dataclasses.field(default_factory=list)
    nll: list[float] = dataclasses.field(default_factory=list)
    embedding: list[np.ndarray] = dataclasses.field(default_factory=list)
    embed_dim: int | None = None  # the model's hidden size when this shard holds embeddings

    def add(
        self, data: Any, batch: Batch, nll: np.ndarray, cnt: np.ndarray, *emb: np.ndarray
    ) -> None:
        sel = batch.example_index >= 0
        for i, v, c in zip(batch.example_index[sel], nll[sel], cnt[sel]):
            self.ids.append(data.example_ids[i])
            self.index.append(int(data.rows[i]))
            self.n_tokens.append(int(round(float(c))))
            self.nll.append(float(v))
        if emb:  # [R, S, D] -> the real examples' rows, in the same order
            self.embedding.extend(np.asarray(emb[0][sel], np.float32))

    def write(self, path: Path) -> None:
        cols = {
            "example_id": pa.array(self.ids, pa.string()),
            "index": pa.array(self.index, pa.int64()),
            "n_tokens": pa.array(self.n_tokens, pa.int64()),
            "nll": pa.array(self.nll, pa.float64()),
        }
        if self.embed_dim is not None:  # also when this process had only filler rows here:
            # every shard of the model has the column, so the merge can concatenate them
            flat = np.concatenate(self.embedding) if self.embedding else np.zeros(0, np.float32)
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat, pa.float32()), self.embed_dim
            )
        table = pa.table(cols)
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


def ifd_models(cfg: Config) -> tuple[str, ...]:
    """The models whose response-alone NLL is computed: `scoring.ifd`, and the proxy always."""
    sc = cfg.scoring
    return tuple(m for m in MODELS if m in sc.ifd or (m == "proxy" and sc.proxy is not None))


def run_identity(
    cfg: Config, data: TokenizedData, fingerprints: dict[str, str], start: int | None = None
) -> dict[str, Any]:
    """What must be equal for two runs' shards to be mixed (`start`: the response-alone
    view's start token, with IFD)."""
    ifd = ifd_models(cfg)
    return {
        "data": data.fields,
        "models": fingerprints,
        "dtype": [cfg.model.dtype, cfg.model.compute_dtype or cfg.model.dtype],
        "batching": {**batching_identity(cfg), "shard_batches": cfg.scoring.shard_batches},
        "resident": cfg.scoring.resident,
        "process_count": jax.process_count(),
        # The response-alone view's start token is part of what its shards hold.
        **({"ifd": list(ifd), "ifd_start": start} if ifd else {}),
        **({"embed": cfg.scoring.embed} if cfg.scoring.embed else {}),
    }


def _load(cfg: Config, source: str, mesh: Mesh) -> Decoder:
    m = cfg.model
    return load_model(source, m.dtype, mesh, **m.run_options())


class _Resident:
    """The models of one pass group, loaded when a pass first needs them and kept for the
    group's other view (the response-alone pass reuses what the prompted pass loaded)."""

    def __init__(self, cfg: Config, mesh: Mesh, timings: dict[str, float]) -> None:
        self.cfg, self.mesh, self.timings = cfg, mesh, timings
        self.models: dict[str, Decoder] = {}

    def get(self, names: list[str]) -> dict[str, Decoder]:
        missing = [m for m in names if m not in self.models]
        if missing:
            t0 = time.time()
            for m in missing:
                self.models[m] = _load(self.cfg, getattr(self.cfg.scoring, m), self.mesh)
            self.timings["load_" + "+".join(missing)] = time.time() - t0
        return {m: self.models[m] for m in names}


def scored_models(cfg: Config) -> tuple[str, ...]:
    """The models this run scores: those given (the reference alone: the reference log-probs
    of preference pairs for DPO; the proxy alone: Superfiltering)."""
    return tuple(m for m in MODELS if getattr(cfg.scoring, m) is not None)


def _passes(cfg: Config) -> list[tuple[str, ...]]:
    models = scored_models(cfg)
    return [models] if cfg.scoring.resident == "both" else [(m,) for m in models]


def _check_request(cfg: Config) -> None:
    sc = cfg.scoring
    missing = [f"scoring.{k}" for k in ("out",) if getattr(sc, k) is None]
    missing += ["data.path"] if cfg.data.path is None else []
    if not scored_models(cfg):
        missing.append("one of scoring.base, scoring.reference, scoring.proxy")
    if missing:
        raise ValueError(f"davir score needs {', '.join(missing)}")
    unset = [m for m in sc.ifd if getattr(sc, m) is None]
    if unset:
        raise ValueError(f"scoring.ifd lists {unset} but scoring.{unset[0]} is not set")
    if sc.embed is not None and getattr(sc, sc.embed) is None:
        raise ValueError(f"scoring.embed is {sc.embed} but scoring.{sc.embed} is not set")


def _views(cfg: Config, data: TokenizedData, tok: Any) -> dict[str, tuple[Any, list]]:
    """Shard-name suffix -> (examples, their batch plans): the prompted examples, and the
    responses alone when some model computes IFD."""
    views: dict[str, tuple[Any, list]] = {"": (data, data.plans(shuffle=False))}
    if ifd_models(cfg):
        alone = ResponseAlone(data, start_token(tok))
        views[ALONE] = (alone, alone.plans(shuffle=False))
    return views


@checked("score")  # preflight: every input and output checked, the output locked
def score(cfg: Config, progress: bool = True, mesh: Mesh | None = None) -> Path:
    """Run (or resume) the scoring job described by `cfg`; returns the output directory.

    `mesh` defaults to `cfg.mesh` over all devices.
    """
    _check_request(cfg)
    sc = cfg.scoring
    t_start = time.time()
    if mesh is None:
        mesh = mesh_from_config(cfg.mesh)  # first: it may set the CPU device count
    pi, pc = jax.process_index(), jax.process_count()
    check_batch_rows(cfg, mesh)
    tok, fingerprints = _tokenizer(cfg)
    # Preference files: both responses of every pair are scored (ids ".../chosen", ".../rejected").
    pairs = resolve_format(cfg.data.path, cfg.data.format) in PAIR_FORMATS
    data = prepare(cfg.data, tok, pi, pc, progress=progress and pi == 0, pairs=pairs)
    out = storage.upath(sc.out)  # a local path or a URL (gs://)
    identity = run_identity(cfg, data, fingerprints, start_token(tok))
    claim_run_dir(out, identity, sc.overwrite, "scoring run")
    views = _views(cfg, data, tok)
    layout: dict[str, int] = {}  # shard name -> number of shards
    timings: dict[str, float] = {}
    for group in _passes(cfg):
        resident = _Resident(cfg, mesh, timings)
        for suffix, (view, plans) in views.items():
            names = {m + suffix: m for m in group if not suffix or m in ifd_models(cfg)}
            layout |= dict.fromkeys(names, math.ceil(len(plans) / sc.shard_batches))
            if names:
                _score_pass(cfg, out, view, plans, names, resident, timings, progress)
    _barrier(f"davir score shards {out}")
    if pi == 0:
        _merge(cfg, out, data, identity, layout, pc, timings, t_start)
    _barrier(f"davir score merged {out}")
    return out


def _tokenizer(cfg: Config) -> tuple[Any, dict[str, str]]:
    """The tokenizer every model is scored with, and the fingerprints of the models and it."""
    sc = cfg.scoring
    models = scored_models(cfg)
    # The tokenizer's ids must fit every model's vocabulary (else every NLL is NaN).
    tok = load_tokenizer_for(
        sc.tokenizer or getattr(sc, models[0]), tuple(getattr(sc, m) for m in models)
    )
    fingerprints = {m: model_fingerprint(getattr(sc, m)) for m in models}
    fingerprints["tokenizer"] = tokenizer_fingerprint(tok)
    if sc.tokenizer is None:
        for m in models[1:]:
            try:
                own = load_tokenizer_for(getattr(sc, m))
            except (OSError, ValueError):
                own = None  # a model without its own tokenizer uses the first one's
            if own is not None and tokenizer_fingerprint(own) != fingerprints["tokenizer"]:
                raise ValueError(
                    f"the {models[0]} ({getattr(sc, models[0])}) and {m} ({getattr(sc, m)}) "
                    "tokenizers differ; scores would compare different token sequences"
                )
    return tok, fingerprints


def _score_pass(
    cfg: Config,
    out: Path,
    data: Any,
    plans: list,
    names: dict[str, str],
    resident: _Resident,
    timings: dict[str, float],
    progress: bool,
) -> None:
    """Score the shards this process has not written yet, each shard name of `names` (-> its
    model) over `data`'s batches, writing one Parquet shard per name and `shard_batches`
    batches. The models are loaded only when some shard is left to do."""
    sc, pi, pc = cfg.scoring, jax.process_index(), jax.process_count()
    k = sc.shard_batches
    n_shards = math.ceil(len(plans) / k)
    for m in names:
        (out / "shards" / m).mkdir(parents=True, exist_ok=True)
        for stale in (out / "shards" / m).glob(f".p{pi:05d}-*.tmp-*"):
            stale.unlink(missing_ok=True)  # a write cut short by a kill
    # The first shard some process has not finished: everyone resumes there (lockstep).
    done = (all(_shard_path(out, m, pi, s).is_file() for m in names) for s in range(n_shards))
    first = _agree_min(next((s for s, d in enumerate(done) if not d), n_shards))
    if first == n_shards:
        return
    models = resident.get(list(dict.fromkeys(names.values())))
    loaded = {name: models[m] for name, m in names.items()}
    embed = [sc.embed] if sc.embed in names else []  # the prompted view's model only
    t0 = time.time()
    n_ex = n_tok = 0
    what = "score" + (" (responses alone)" if isinstance(data, ResponseAlone) else "")
    bar = progress_bar(len(plans), what, "batch", progress and pi == 0, first * k)
    for s in range(first, n_shards):
        shards = {
            m: _Shard(embed_dim=loaded[m].arch.hidden_size if m in embed else None) for m in names
        }
        batches = (b for _, b in data.batches(plans[: (s + 1) * k], pi, pc, start=s * k))
        bad: list[str] = []
        for batch, nlls in stream_nll(loaded, batches, data.num_segments, sc.chunk, embed):
            for m in names:
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
        for m in names:
            shards[m].write(_shard_path(out, m, pi, s))
    bar.close()
    key = "+".join(names)
    timings["score_" + key] = time.time() - t0
    timings["tokens_per_s_" + key] = n_tok * pc / max(time.time() - t0, 1e-9)


def _read_model_shards(out: Path, model: str, n_shards: int, pc: int) -> pa.Table:
    tables = [
        storage.read_parquet(_shard_path(out, model, p, s))
        for p in range(pc)
        for s in range(n_shards)
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
    layout: dict[str, int],
    pc: int,
    timings: dict[str, float],
    t_start: float,
) -> None:
    """Join every process's shards into `scores.parquet` and its manifest, refusing missing,
    duplicated or non-finite examples (never a complete table that is not whole)."""
    cols = {m: _checked_shards(out, m, data, n, pc) for m, n in layout.items()}
    first = next(iter(cols))
    ids = cols[first].column("example_id").to_pylist()
    for m, t in cols.items():
        if t.column("example_id").to_pylist() != ids:
            raise RuntimeError(f"{out}: {first} and {m} shards hold different examples")
        if m.endswith(ALONE) and not t.column("n_tokens").equals(
            cols[m.removesuffix(ALONE)].column("n_tokens")
        ):  # the response alone must be scored on exactly the prompted response's tokens
            raise RuntimeError(f"{out}: {m} shards count other tokens than {m[: -len(ALONE)]}")
    table = _scores_table(data, cols)
    if cfg.scoring.embed is not None:
        _write_embeddings(out, cols[cfg.scoring.embed])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(out / SCORES_FILE, sink.getvalue().to_pybytes())
    write_json(
        out / MANIFEST_FILE,
        _manifest(cfg, data, table, identity, timings, t_start),
        sort_keys=True,
    )
    if cfg.scoring.diagnostics and ("base" in cols or ifd_models(cfg)):
        write_diagnostics(out, echo=False)


def _write_embeddings(out: Path, shards: pa.Table) -> None:
    """`embeddings.npy`: float32 [N, D], row i = example i of scores.parquet (written before
    it, so a complete table always has its embeddings)."""
    if "embedding" not in shards.column_names:
        raise RuntimeError(f"{out}: the shards hold no embeddings (rescore with --overwrite)")
    col = shards.column("embedding").combine_chunks()
    # flatten() honours the array's offset (values would not)
    emb = col.flatten().to_numpy().reshape(len(col), col.type.list_size).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    write_atomic(out / EMBEDDINGS_FILE, buf.getvalue())


def _manifest(
    cfg: Config,
    data: TokenizedData,
    table: pa.Table,
    identity: dict[str, Any],
    timings: dict[str, float],
    t_start: float,
) -> dict[str, Any]:
    return {
        "kind": "davir-scores",
        "complete": True,
        "n_examples": table.num_rows,
        "n_response_tokens": int(np.sum(table.column("n_tokens").to_numpy())),
        "data": {
            "path": storage.resolved(data.cfg.path),
            "format": data.fields["format"],
            "name": data.source,
            "sha256": data.fields["data_sha256"],
        },
        "template": data.cfg.template,
        "fingerprints": {**identity["models"], "data": data.fields["data_sha256"]},
        "models": {m: getattr(cfg.scoring, m) for m in MODELS},
        "ifd": list(ifd_models(cfg)),
        "embeddings": None
        if cfg.scoring.embed is None
        else {
            "file": EMBEDDINGS_FILE,
            "model": cfg.scoring.embed,
            # What a row is: comparable only with rows from the same model and pooling.
            "pooling": "mean of the final-norm hidden states over the response tokens",
        },
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


def _scores_table(data: TokenizedData, cols: dict[str, pa.Table]) -> pa.Table:
    """The merged table: the source columns, `nll_base`/`nll_ref` (null for a model the run did
    not score), `logp_ref`, and the IFD columns the run computed."""
    anchor = next(iter(cols.values()))
    rows = anchor.column("index").to_pylist()
    text = _source_rows(data, set(rows))
    records = [text[r] for r in rows]
    nll = {}
    for m, t in cols.items():
        model = m.removesuffix(ALONE)
        nll[NLL_COLUMN[model] + (ALONE if m.endswith(ALONE) else "")] = t.column("nll")
    nulls = pa.nulls(len(rows), pa.float64())
    ref = nll.get("nll_ref")
    return pa.table(
        {
            "example_id": anchor.column("example_id"),
            "source": pa.array([data.source] * len(rows), pa.string()),
            "row": anchor.column("index"),
            "content_hash": pa.array(
                [hashlib.sha256(t.encode()).hexdigest()[:16] for t in records], pa.string()
            ),
            "n_tokens": anchor.column("n_tokens"),
            "nll_base": nll.pop("nll_base", nulls),
            "nll_ref": nll.pop("nll_ref", nulls),
            # Summed log-probs, for DPO (log p_ref(y|x) = -nll_ref).
            "logp_ref": nulls if ref is None else pa.array(-ref.to_numpy(), pa.float64()),
            "record": pa.array(records, pa.string()),
            **{c: nll[c] for c in OPTIONAL_NLL_COLUMNS if c in nll},
        }
    )


def iter_scores(out: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a finished scoring run's table, as dicts."""
    yield from storage.read_parquet(storage.upath(out) / SCORES_FILE).to_pylist()
