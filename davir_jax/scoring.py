"""The DavIR scoring job: every example's response NLL under a base and a reference model.

    davir score --data FILE --template plain --base SRC --reference SRC --out DIR

One pass over a tokenized data set (`davir_jax.data`); each fixed-shape batch goes through both
models (or, with `scoring.resident=sequential`, all batches through the base, then all through the
reference, for when both do not fit), so both see the same token ids and masks. The per-example
summed NLL is `davir_jax.losses.example_nll`, the same function the trainers use.

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
import functools
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from davir_jax.config import Config, to_dict
from davir_jax.data.batching import Batch
from davir_jax.data.readers import iter_rows
from davir_jax.data.skips import SkipLog
from davir_jax.io_utils import progress_bar, write_atomic, write_json
from davir_jax.losses import LM_HEAD_CHUNK, example_nll
from davir_jax.models.arch import ArchConfig
from davir_jax.models.decoder import Decoder, RunConfig
from davir_jax.models.loading import load_model, load_tokenizer_for, model_fingerprint
from davir_jax.models.tokenizer import tokenizer_fingerprint
from davir_jax.models.weights import abstract_model
from davir_jax.preflight import checked
from davir_jax.runs import batching_identity, check_batch_rows, claim_run_dir
from davir_jax.sharding import batch_sharding, mesh_from_config, state_shardings

if TYPE_CHECKING:  # the data layer (tensorflow-datasets) loads only when a job runs
    from davir_jax.data.dataset import TokenizedData

MODELS = ("base", "reference")
SCORES_FILE = "scores.parquet"
MANIFEST_FILE = "manifest.json"
_BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


# -- non-finite values ---------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError, ValueError):
    """A model gave a NaN or infinite loss: nothing computed from it is written."""


def name_examples(ids: list[str], limit: int = 8) -> str:
    """`a, b, c (+N more)`: example ids for a one-line error."""
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def nonfinite_examples(batch: Batch, nll: np.ndarray, example_ids: Any) -> list[str]:
    """Ids of the real examples of a host batch whose NLL (`[R, S]`) is NaN or infinite."""
    bad = (batch.example_index >= 0) & ~np.isfinite(nll)
    return [str(example_ids[i]) for i in batch.example_index[bad]]


# -- the jitted step -----------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def nll_step(arch: ArchConfig, run: RunConfig, num_segments: int, chunk: int) -> Any:
    """Jitted `(state, ids, segment_ids, positions, loss_mask) -> (nll [B, S], count [B, S])`.

    Built once per model configuration. On a mesh, the parameter shardings come from the rules
    table, the batch is split over the data-parallel axes, and the (small) outputs are
    replicated so every process can read its own rows.
    """
    graphdef, abs_state = abstract_model(arch, run)

    def step(state: nnx.State, ids: jax.Array, seg: jax.Array, pos: jax.Array, mask: jax.Array):
        model = nnx.merge(graphdef, state)
        return example_nll(model, ids, seg, pos, mask, num_segments, chunk)

    mesh = run.sharder.mesh
    if mesh is None:
        return jax.jit(step)
    rows = batch_sharding(mesh, 2)
    rep = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_shardings(abs_state, mesh), rows, rows, rows, rows),
        out_shardings=(rep, rep),
    )


def device_batch(batch: Batch, mesh: Mesh | None) -> list[jax.Array]:
    """This process's host rows -> global arrays sharded over the data-parallel axes."""
    arrays = [getattr(batch, k) for k in _BATCH_KEYS]
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    sharding = batch_sharding(mesh, 2)
    return [jax.make_array_from_process_local_data(sharding, a) for a in arrays]


def _launch_nll(
    model: Decoder, batch: Batch, num_segments: int, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Dispatch one batch's step; JAX returns before the device has finished it."""
    _, state = nnx.split(model)
    fn = nll_step(model.arch, model.run, num_segments, chunk)
    return fn(state, *device_batch(batch, model.run.sharder.mesh))


def _local_rows(batch: Batch, out: tuple[jax.Array, jax.Array]) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of a step's global `[R, S]` outputs, on the host (waits for them)."""
    r = batch.input_ids.shape[0]
    lo = jax.process_index() * r if jax.process_count() > 1 else 0
    return np.asarray(out[0])[lo : lo + r], np.asarray(out[1])[lo : lo + r]


def batch_nll(
    model: Decoder, batch: Batch, num_segments: int, chunk: int = LM_HEAD_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) `[R_local, S]` of this process's rows of one batch."""
    return _local_rows(batch, _launch_nll(model, batch, num_segments, chunk))


def stream_nll(
    models: dict[str, Decoder],
    batches: Iterable[Batch],
    num_segments: int,
    chunk: int = LM_HEAD_CHUNK,
) -> Iterator[tuple[Batch, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Every batch, in order, with each model's `batch_nll` of it. The next batch's steps are
    dispatched before this batch's results are read back, so the host's work (assembling and
    sending the next batch, and the caller's: shards, progress) overlaps the device's."""

    def read(batch: Batch, launched: dict[str, Any]) -> tuple[Batch, dict[str, Any]]:
        return batch, {m: _local_rows(batch, out) for m, out in launched.items()}

    pending = None
    for batch in batches:
        launched = {m: _launch_nll(md, batch, num_segments, chunk) for m, md in models.items()}
        if pending is not None:
            yield read(*pending)
        pending = (batch, launched)
    if pending is not None:
        yield read(*pending)


def dataset_nll(
    model: Decoder,
    plans: list[Any],
    num_segments: int,
    get: Any,
    n_examples: int,
    chunk: int = LM_HEAD_CHUNK,
    desc: str | None = None,
    example_ids: Any = None,
    what: str = "the model",
) -> tuple[np.ndarray, np.ndarray]:
    """Every example's summed response NLL and token count `([N], [N])` over global batch
    `plans`: each process runs its own rows of every batch, and the arrays are gathered so every
    process gets all of them. `get(indices)` gives (input_ids, loss_mask) per example.

    A NaN or infinite NLL raises `NonFiniteLossError` naming the examples (`example_ids[i]`, or
    the indices): at its batch on one process, after the gather (so every process raises
    together) on several."""
    from davir_jax.data.batching import assemble, local_rows

    pi, pc = jax.process_index(), jax.process_count()
    nll, cnt = np.zeros(n_examples), np.zeros(n_examples)
    bar = progress_bar(len(plans), desc or "nll", "batch", desc is not None and pi == 0)
    batches = (assemble(local_rows(p, pi, pc), p.width, num_segments, get) for p in plans)
    names = example_ids if example_ids is not None else range(n_examples)

    def refuse(bad: list[str]) -> None:
        raise NonFiniteLossError(
            f"{what} gives a non-finite NLL for example(s) {name_examples(bad)}; "
            "nothing was written"
        )

    for batch, out in stream_nll({"model": model}, batches, num_segments, chunk):
        a, c = out["model"]
        if pc == 1 and (bad := nonfinite_examples(batch, a, names)):
            refuse(bad)
        sel = batch.example_index >= 0
        nll[batch.example_index[sel]] = a[sel]
        cnt[batch.example_index[sel]] = c[sel]
        bar.update(1)
    bar.close()
    if pc > 1:  # rows scored elsewhere are 0 here; NLLs and counts are >= 0
        from jax.experimental import multihost_utils

        nll = np.max(multihost_utils.process_allgather(nll), axis=0)  # NaN wins the max
        cnt = np.max(multihost_utils.process_allgather(cnt), axis=0)
        if not np.isfinite(nll).all():
            refuse([str(names[i]) for i in np.flatnonzero(~np.isfinite(nll))])
    return nll, cnt


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
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def _agree_max(value: int) -> int:
    """The maximum of `value` over all processes (every process gets the same answer)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def _refuse_nonfinite(bad: list[str], shard: int) -> None:
    where = name_examples(bad) if bad else "examples of another process (see its log)"
    raise NonFiniteLossError(
        f"non-finite NLL in shard {shard} for {where}; the shard was not written (check the "
        "model's weights and that its vocabulary covers the tokenizer)"
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

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
    from davir_jax.data.dataset import prepare
    from davir_jax.data.readers import PAIR_FORMATS, resolve_format

    # Preference files: both responses of every pair are scored (ids ".../chosen", ".../rejected").
    pairs = resolve_format(cfg.data.path, cfg.data.format) in PAIR_FORMATS
    data = prepare(cfg.data, tok, pi, pc, progress=progress and pi == 0, pairs=pairs)
    out = Path(sc.out)
    identity = run_identity(cfg, data, fingerprints)
    claim_run_dir(out, identity, sc.overwrite, "scoring run")
    plans = data.plans(shuffle=False)
    k = sc.shard_batches
    n_shards = math.ceil(len(plans) / k)
    timings: dict[str, float] = {}
    for models in _passes(cfg):
        for m in models:
            (out / "shards" / m).mkdir(parents=True, exist_ok=True)
            for stale in (out / "shards" / m).glob(f".p{pi:05d}-*.tmp-*"):
                stale.unlink(missing_ok=True)  # a write cut short by a kill
        # The first shard some process has not finished: everyone resumes there (lockstep).
        first = next(
            (
                s
                for s in range(n_shards)
                if not all(_shard_path(out, m, pi, s).is_file() for m in models)
            ),
            n_shards,
        )
        first = _agree_min(first)
        if first == n_shards:
            continue
        t0 = time.time()
        loaded = {m: _load(cfg, getattr(sc, m), mesh) for m in models}
        timings["load_" + "+".join(models)] = time.time() - t0
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
                        f"{i} ({m})"
                        for i in nonfinite_examples(batch, nlls[m][0], data.example_ids)
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
        timings["score_" + "+".join(models)] = time.time() - t0
        timings["tokens_per_s_" + "+".join(models)] = n_tok * pc / max(time.time() - t0, 1e-9)
        del loaded
    _barrier(f"davir score shards {out}")
    if pi == 0:
        _merge(cfg, out, data, identity, n_shards, pc, timings, t_start)
    _barrier(f"davir score merged {out}")
    return out


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
    import hashlib

    cols = {}
    models = scored_models(cfg)
    for m in models:
        # (row, id): the two responses of a preference pair share a row.
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
        cols[m] = t
    ref = cols["reference"]
    base = cols.get("base")
    if base is not None and (
        base.column("example_id").to_pylist() != ref.column("example_id").to_pylist()
    ):
        raise RuntimeError(f"{out}: base and reference shards hold different examples")
    rows = ref.column("index").to_pylist()
    text = _source_rows(data, set(rows))
    records = [text[r] for r in rows]
    table = pa.table(
        {
            "example_id": ref.column("example_id"),
            "source": pa.array([data.source] * len(rows), pa.string()),
            "row": ref.column("index"),
            "content_hash": pa.array(
                [hashlib.sha256(t.encode()).hexdigest()[:16] for t in records], pa.string()
            ),
            "n_tokens": ref.column("n_tokens"),
            "nll_base": base.column("nll")
            if base is not None
            else pa.nulls(len(rows), pa.float64()),
            "nll_ref": ref.column("nll"),
            # Summed log-probs, for DPO (log p_ref(y|x) = -nll_ref).
            "logp_ref": pa.array(-ref.column("nll").to_numpy(), pa.float64()),
            "record": pa.array(records, pa.string()),
        }
    )
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
        from davir_jax.diagnostics import write_diagnostics

        write_diagnostics(out, echo=False)


def iter_scores(out: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a finished scoring run's table, as dicts."""
    yield from pq.read_table(Path(out) / SCORES_FILE).to_pylist()
