"""Preference training (`davir dpo`): DPO, IPO, token-normalised DPO, DavIR-DPO and any
objective a plugin registers (`davir_jax.plugins`).

    davir dpo --model SFT --data pairs.jsonl --template chat --out DIR --objective davir_dpo

Pairs come from the preference readers (`preference`, `hh_rlhf`, `gsm8k_solutions`) with both
responses tokenized; a pair is planned as one item (its two responses side by side in a packed
row, chosen then rejected), so the step reads per-pair values from consecutive segments.

The reference log-probs are computed once before training with the reference model (or read from
a `davir score` run on the same pairs), cached under `data.cache_dir`, and fed in the batch: the
reference model is not resident while training (method.md: everything DavIR-DPO needs from the
reference comes out of the scoring pass). `dpo.reference_in_step=true` computes them inside the
step instead, under `stop_gradient`. The loop, optimizer, sharding, checkpoints, resume and
logging are `davir_jax.jobs.sft.fit`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx
from jax.sharding import Mesh

from davir_jax.config import Config
from davir_jax.core import storage
from davir_jax.core.io import write_atomic
from davir_jax.core.losses import LM_HEAD_CHUNK, PREFERENCE_OBJECTIVES, REFERENCE_FREE, example_nll
from davir_jax.core.runs import check_batch_rows
from davir_jax.core.schema import to_dict
from davir_jax.core.sharding import mesh_from_config
from davir_jax.core.stats import bootstrap_ci, correlation_ci
from davir_jax.data.batching import BatchPlan
from davir_jax.data.dataset import make_plans, prepare
from davir_jax.engine.nll import NonFiniteLossError, dataset_nll, name_examples
from davir_jax.engine.preflight import checked
from davir_jax.engine.trainer import Job, Objective, fit, plan_steps, step_batch
from davir_jax.models.loading import load_model, load_tokenizer_for, model_fingerprint

PAIR_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "weights", "ref_nll")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def pair_values(
    name: str,
    beta: float,
    label_smoothing: float,
    nll: jax.Array,
    ref_nll: jax.Array,
    count: jax.Array,
    weights: jax.Array,
    nll_weight: float = 0.0,
    options: dict[str, float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Per-pair loss, TRL-named metric sums and pair weights from per-segment values `[B, S]`
    (segment 2k is a pair's chosen response, 2k+1 its rejected one). `nll_weight` adds that
    multiple of the chosen response's mean token NLL (`nll_loss`); `options` are the
    objective's own keywords."""
    fn = PREFERENCE_OBJECTIVES[name][0]

    def pair(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], x.shape[1] // 2, 2)

    w = pair(weights)[..., 0]
    real = w > 0
    # Filler segments get harmless values (a zero reference NLL would divide by zero).
    logp = jnp.where(real[..., None], -pair(nll), 0.0)
    ref = jnp.where(real[..., None], -pair(ref_nll), -1.0)
    n = jnp.where(real[..., None], pair(count), 1.0)
    loss, rc, rr = fn(
        logp[..., 0],
        logp[..., 1],
        ref[..., 0],
        ref[..., 1],
        n[..., 0],
        n[..., 1],
        beta,
        label_smoothing,
        **(options or {}),
    )
    aux = {
        "rewards/chosen": (rc * w).sum(),
        "rewards/rejected": (rr * w).sum(),
        "rewards/margins": ((rc - rr) * w).sum(),
        "rewards/accuracies": ((rc > rr) * w).sum(),
        "logps/chosen": (logp[..., 0] * w).sum(),
        "logps/rejected": (logp[..., 1] * w).sum(),
    }
    if nll_weight:
        chosen_nll = -logp[..., 0] / n[..., 0]
        loss = loss + nll_weight * chosen_nll
        aux["nll_loss"] = (chosen_nll * w).sum()
    return loss * w, aux, w


def preference_objective(
    name: str,
    beta: float,
    label_smoothing: float = 0.0,
    chunk: int = LM_HEAD_CHUNK,
    nll_weight: float = 0.0,
    options: dict[str, float] | None = None,
) -> Objective:
    """The mean over the pairs of the global batch of objective `name`'s per-pair loss (plus
    `nll_weight` x the chosen response's mean token NLL; `options`: the objective's keywords)."""

    def fn(model: Any, micro: dict[str, jax.Array], ref_model: Any = None):
        args = (micro["input_ids"], micro["segment_ids"], micro["positions"], micro["loss_mask"])
        s = micro["weights"].shape[-1]
        nll, cnt = example_nll(model, *args, s, chunk)
        if ref_model is not None:
            ref_nll = jax.lax.stop_gradient(example_nll(ref_model, *args, s, chunk)[0])
        else:
            ref_nll = micro["ref_nll"]
        loss, aux, w = pair_values(
            name, beta, label_smoothing, nll, ref_nll, cnt, micro["weights"], nll_weight, options
        )
        # A pair's loss is non-finite if either response's value is: flag both of its segments.
        pair_bad = jnp.repeat((w > 0) & ~jnp.isfinite(loss), 2, axis=-1)
        real = micro["weights"] > 0
        bad = real & (~jnp.isfinite(nll) | ~jnp.isfinite(ref_nll) | pair_bad)
        return loss.sum(), w.sum(), aux, bad

    metrics = METRICS + (("nll_loss",) if nll_weight else ())
    return Objective(name, fn, PAIR_KEYS, metrics, denom_name="pairs")


def config_objective(dc: Any, chunk: int) -> Objective:
    """`preference_objective` of a `dpo` config section."""
    return preference_objective(
        dc.objective,
        dc.resolved_beta,
        dc.label_smoothing,
        chunk,
        dc.nll_weight,
        dict(dc.objective_args),
    )


# -- pairs -------------------------------------------------------------------------------------


def held_out(pair_id: str, fraction: float) -> bool:
    """Whether a pair is in the evaluation split: a hash of its id, so the split is the same on
    every host and run, and independent of file order."""
    h = int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


class PairData:
    """The pairs of a tokenized preference data set (`prepare(..., pairs=True)`), as plans of
    pairs that become rows of consecutive (chosen, rejected) segments."""

    def __init__(self, data: Any, keep: np.ndarray | None = None) -> None:
        self.data, cfg = data, data.cfg
        pos = {int(ix): i for i, ix in enumerate(data.store.indices)}
        rows = sorted({int(ix) // 2 for ix in data.store.indices})
        c = np.array([pos[2 * r] for r in rows], np.int64)
        r_ = np.array([pos[2 * r + 1] for r in rows], np.int64)
        self._all = keep is None
        if keep is not None:
            c, r_ = c[keep], r_[keep]
        self.chosen, self.rejected = c, r_
        self.pair_ids = [data.example_ids[i].rsplit("/", 1)[0] for i in c]
        self.lengths = data.lengths[c] + data.lengths[r_]
        # Pair-level planning: rows hold whole pairs, max_segments counts responses.
        self.cfg = dataclasses.replace(
            cfg,
            max_len=2 * cfg.max_len,
            row_len=max(cfg.packed_row_len, 2 * cfg.max_len),
            max_segments=max(cfg.max_segments // 2, 1),
        )
        self.num_segments = 2 * (self.cfg.max_segments if cfg.pack else 1)

    def __len__(self) -> int:
        return len(self.chosen)

    def split(self, fraction: float) -> tuple[PairData, PairData]:
        """(training pairs, held-out pairs) of all the data set's pairs."""
        if not self._all:
            raise ValueError("split() applies to all pairs of a data set")
        ev = np.array([held_out(p, fraction) for p in self.pair_ids], bool)
        return PairData(self.data, ~ev), PairData(self.data, ev)

    def get(self, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.data.get(idx)

    def expand(self, plan: BatchPlan) -> BatchPlan:
        """A plan of pairs as a plan of responses: pair p becomes segments (chosen[p],
        rejected[p])."""
        rows = tuple(
            tuple(int(x) for q in row for x in (self.chosen[q], self.rejected[q]))
            for row in plan.rows
        )
        return BatchPlan(plan.width, rows)

    def plans(self, shuffle: bool = False, seed: int = 0) -> list[BatchPlan]:
        """Example-level plans of all the pairs (evaluation; training plans come from
        `train.plan_steps`)."""

        return [self.expand(p) for p in make_plans(self.lengths, self.cfg, shuffle, seed)]


# -- reference log-probs -----------------------------------------------------------------------


def reference_nll(cfg: Config, data: Any, mesh: Mesh, progress: bool = True) -> np.ndarray:
    """Summed reference NLL of every response of `data` (store order): from a `davir score` run
    (`dpo.reference_scores`), else computed once with the reference model and cached."""
    dc = cfg.dpo
    ids = data.example_ids
    if dc.reference_scores is not None:
        return _scored_reference_nll(storage.upath(dc.reference_scores), ids)
    ref = dc.reference or cfg.model.source
    key = hashlib.sha256(
        json.dumps(
            {
                "reference": model_fingerprint(ref),
                "data": data.fields,
                "dtype": [cfg.model.dtype, cfg.model.compute_dtype or cfg.model.dtype],
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cache = storage.upath(cfg.data.cache_dir) / f"reference-nll-{key}.parquet"
    if cache.is_file():
        t = storage.read_parquet(cache)
        if t.column("example_id").to_pylist() == list(ids):
            return t.column("nll").to_numpy()
    m = cfg.model
    model = load_model(ref, m.dtype, mesh, **m.run_options())
    desc = "reference" if progress else None
    nll, _ = dataset_nll(
        model,
        data.plans(),
        data.num_segments,
        data.get,
        len(ids),
        cfg.train.chunk,
        desc,
        example_ids=ids,
        what=f"the reference {ref}",
    )
    if jax.process_index() == 0:
        storage.upath(cfg.data.cache_dir).mkdir(parents=True, exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"example_id": ids, "nll": nll}), sink)
        write_atomic(cache, sink.getvalue().to_pybytes())
    return nll


def _scored_reference_nll(path: Path, ids: Sequence[str]) -> np.ndarray:
    """`nll_ref` of every response of `ids` from a `davir score` run (its dir or table)."""
    table = storage.read_parquet(
        path / "scores.parquet" if path.is_dir() else path, columns=["example_id", "nll_ref"]
    )
    got = dict(zip(table.column("example_id").to_pylist(), table.column("nll_ref").to_pylist()))
    missing = [i for i in ids if i not in got]
    if missing:
        raise ValueError(
            f"{path}: no reference NLL for {len(missing)} responses, e.g. {missing[:3]}; "
            "score the same pairs file with the same template and tokenizer"
        )
    out = np.array([got[i] for i in ids], np.float64)
    if not np.isfinite(out).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(out))]
        raise NonFiniteLossError(
            f"{path}: non-finite reference NLL for {name_examples(bad)}; rescore the pairs"
        )
    return out


# -- evaluation on held-out pairs --------------------------------------------------------------


def evaluate_pairs(
    model: Any,
    pairs: PairData,
    ref_nll: np.ndarray,
    name: str,
    beta: float,
    chunk: int = LM_HEAD_CHUNK,
    options: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Preference accuracy, mean margin and the Pearson correlation of the margin with the
    chosen-minus-rejected length difference (tokens) on `pairs` (method.md: 0.38 for DPO vs
    0.07 for DavIR-DPO in the paper)."""

    data = pairs.data
    nll, cnt = dataset_nll(
        model,
        pairs.plans(),
        pairs.num_segments,
        data.get,
        len(data),
        chunk,
        example_ids=data.example_ids,
        what="the trained model",
    )
    c, r = pairs.chosen, pairs.rejected
    fn = PREFERENCE_OBJECTIVES[name][0]
    args = (-nll[c], -nll[r], -ref_nll[c], -ref_nll[r], cnt[c], cnt[r], beta, 0.0)
    _, rc, rr = fn(*args, **(options or {}))

    margin = np.asarray(rc) - np.asarray(rr)
    dlen = (cnt[c] - cnt[r]).astype(np.float64)
    corr = corr_ci = acc_ci = None
    if len(margin) > 2 and margin.std() > 0 and dlen.std() > 0:
        corr = float(np.corrcoef(margin, dlen)[0, 1])
        iv = correlation_ci(margin, dlen, "pearson")
        corr_ci = [iv.lo, iv.hi]
    if len(margin) > 1:
        # 95% percentile bootstrap over held-out pairs (davir_jax.core.stats).
        iv = bootstrap_ci(lambda m: (m > 0).mean(axis=-1), margin)
        acc_ci = [iv.lo, iv.hi]
    return {
        "pairs": len(margin),
        "accuracy": float(np.mean(margin > 0)) if len(margin) else None,
        "accuracy_ci95": acc_ci,
        "margin_mean": float(margin.mean()) if len(margin) else None,
        "margin_length_pearson": corr,
        "margin_length_pearson_ci95": corr_ci,
    }


# -- the job -----------------------------------------------------------------------------------


@checked("dpo")  # preflight: every input and output checked, the output locked
def dpo(cfg: Config, progress: bool = True, mesh: Mesh | None = None) -> Path:
    """Run (or resume) preference training as described by `cfg`; returns the output dir."""

    dc, tc = cfg.dpo, cfg.train
    if tc.val is not None:
        raise ValueError(
            "train.val: per-epoch validation is for davir sft; davir dpo holds out "
            "dpo.eval_fraction of the pairs instead"
        )
    if tc.out is None or cfg.model.source is None or cfg.data.path is None:
        raise ValueError("davir dpo needs model.source, data.path and train.out")
    mesh = mesh or mesh_from_config(cfg.mesh)  # first: it may set the CPU device count
    pi, pc = jax.process_index(), jax.process_count()
    check_batch_rows(cfg, mesh)
    # Its ids must fit the policy's and the reference's vocabularies.
    tok = load_tokenizer_for(cfg.model.source, (dc.reference,))
    data = prepare(cfg.data, tok, pi, pc, progress=progress and pi == 0, pairs=True)
    train_pairs, eval_pairs = PairData(data).split(dc.eval_fraction)
    if len(train_pairs) == 0:
        raise ValueError(f"{cfg.data.path}: no training pairs left")
    beta = dc.resolved_beta
    ref_source = dc.reference or cfg.model.source
    ref, frozen = _reference(cfg, data, mesh, progress)
    lengths = data.lengths

    def ref_column(bs: list[Any]) -> dict[str, np.ndarray]:
        col = [np.where(b.example_index >= 0, ref[np.maximum(b.example_index, 0)], 0.0) for b in bs]
        return {"ref_nll": np.stack(col).astype(np.float32)}

    def batch(step_plans: Sequence[BatchPlan]) -> dict[str, jax.Array]:
        return step_batch(train_pairs, step_plans, mesh, pi, pc, PAIR_KEYS[:-1], ref_column)

    def count(step_plans: Sequence[BatchPlan]) -> tuple[int, int]:
        idx = [i for p in step_plans for row in p.rows for i in row]
        return len(idx) // 2, int(lengths[idx].sum()) if idx else 0

    job = Job(
        name="dpo",
        objective=config_objective(dc, tc.chunk),
        # The shared planner over pairs (pair-level settings), each pair then as its two
        # responses side by side.
        steps=plan_steps(train_pairs.lengths, train_pairs.cfg, tc, cfg.seed, "pairs").map(
            train_pairs.expand
        ),
        batch=batch,
        count=count,
        tokenizer=tok,
        identity={
            "data": data.fields,
            "dpo": {**to_dict(dc), "beta": beta, "reference": model_fingerprint(ref_source)},
        },
        frozen=frozen,
        after=functools.partial(_held_out, cfg, eval_pairs, ref, frozen, len(train_pairs)),
        example_ids=data.example_ids,
        noun="pairs",
    )
    return fit(cfg, job, mesh, progress)


def _reference(cfg: Config, data: Any, mesh: Mesh, progress: bool) -> tuple[np.ndarray, Any]:
    """(summed reference NLL per response, None), or (zeros, the frozen reference split for
    the step) with `dpo.reference_in_step`; zeros for a reference-free objective (never read)."""
    dc = cfg.dpo
    if dc.objective in REFERENCE_FREE:
        return np.zeros(len(data)), None
    if dc.reference_in_step:
        m = cfg.model
        r = load_model(dc.reference or m.source, m.dtype, mesh, **m.run_options())
        return np.zeros(len(data)), nnx.split(r)
    return reference_nll(cfg, data, mesh, progress), None


def _held_out(
    cfg: Config,
    eval_pairs: PairData,
    ref: np.ndarray,
    frozen: Any,
    n_train: int,
    model: Any,
    out: Path,
) -> dict[str, Any]:
    """`Job.after` of a DPO run: the objective, beta and the held-out pairs' metrics."""
    dc, tc = cfg.dpo, cfg.train
    data = eval_pairs.data
    if frozen is not None:  # no precomputed array: the reference scores the held-out pairs
        ref, _ = dataset_nll(
            nnx.merge(*frozen),
            eval_pairs.plans(),
            eval_pairs.num_segments,
            data.get,
            len(data),
            tc.chunk,
            example_ids=data.example_ids,
            what=f"the reference {dc.reference or cfg.model.source}",
        )
    res = {"objective": dc.objective, "beta": dc.resolved_beta, "train_pairs": n_train}
    if len(eval_pairs):
        res["held_out"] = evaluate_pairs(
            model, eval_pairs, ref, dc.objective, dc.resolved_beta, tc.chunk, dc.objective_args
        )
        print(f"held-out pairs: {json.dumps(res['held_out'])}", file=sys.stderr)
    return res


__all__ = [
    "PairData",
    "dpo",
    "evaluate_pairs",
    "held_out",
    "pair_values",
    "config_objective",
    "preference_objective",
    "reference_nll",
]
