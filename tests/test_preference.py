"""Preference objectives against NumPy; log 2 at the reference; finite gradients at extremes;
training raises margin and accuracy; precomputed reference = in-step reference = a davir score
run; killed-and-resumed DPO equals uninterrupted."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli
from toy_tokenizers import WORDS

from davir_jax.config import Config, DPOConfig
from davir_jax.core.losses import MIN_REF_NLL, PREFERENCE_OBJECTIVES, REFERENCE_FREE
from davir_jax.data.config import DataConfig
from davir_jax.engine.config import OptimizerConfig, TrainConfig
from davir_jax.jobs.dpo import dpo
from davir_jax.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
PLAIN = [w for w in WORDS if w.isalpha()]


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_objective(name, pc, pr, rc, rr, nc, nr, beta, ls):
    """Independent float64 NumPy versions of the formulas in method.md and the papers."""
    pc, pr, rc, rr, nc, nr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr, nc, nr))
    if name == "orpo":  # Hong et al. 2024, Eqs. 6-7: odds of the mean token probability
        mc, mr = np.minimum(pc / nc, -1e-6), np.minimum(pr / nr, -1e-6)
        lo_c, lo_r = mc - np.log(1 - np.exp(mc)), mr - np.log(1 - np.exp(mr))
        return -mc - beta * _log_sigmoid(lo_c - lo_r), beta * mc, beta * mr
    if name == "simpo":  # Meng et al. 2024, Eq. 6, gamma = 0.5 beta
        a, b = beta * pc / nc, beta * pr / nr
        z = a - b - 0.5 * beta
        return -(1 - ls) * _log_sigmoid(z) - ls * _log_sigmoid(-z), a, b
    a, b = beta * (pc - rc), beta * (pr - rr)
    if name == "hinge":
        return np.maximum(0.0, 1.0 - (a - b)), a, b
    if name == "robust":  # Chowdhury et al. 2024, Eq. 8
        z = a - b
        return ((1 - ls) * -_log_sigmoid(z) + ls * _log_sigmoid(-z)) / (1 - 2 * ls), a, b
    if name == "dpo":
        a, b = beta * (pc - rc), beta * (pr - rr)
    elif name == "dpo_norm":
        a, b = beta * (pc - rc) / nc, beta * (pr - rr) / nr
    elif name == "davir_dpo":
        a = beta * (pc - rc) / np.maximum(-rc, MIN_REF_NLL)
        b = beta * (pr - rr) / np.maximum(-rr, MIN_REF_NLL)
    else:  # ipo
        h = (pc - rc) - (pr - rr)
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)
    z = a - b
    return -(1 - ls) * _log_sigmoid(z) - ls * _log_sigmoid(-z), a, b


def _inputs(seed=0, n=64):
    rng = np.random.default_rng(seed)
    nc, nr = rng.integers(1, 300, n).astype(np.float32), rng.integers(1, 300, n).astype(np.float32)
    rc, rr = -nc * rng.uniform(0.2, 3, n), -nr * rng.uniform(0.2, 3, n)
    pc, pr = rc + rng.normal(0, 3, n), rr + rng.normal(0, 3, n)
    return [x.astype(np.float32) for x in (pc, pr, rc, rr, nc, nr)]


@pytest.mark.parametrize("name", sorted(PREFERENCE_OBJECTIVES))
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_objectives_equal_numpy(name, ls):
    fn, beta = PREFERENCE_OBJECTIVES[name]
    args = _inputs()
    got = fn(*(jnp.asarray(a) for a in args), beta, ls)
    want = np_objective(name, *args, beta, 0.0 if name in ("ipo", "orpo", "hinge") else ls)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(PREFERENCE_OBJECTIVES) - REFERENCE_FREE))
def test_log2_at_the_reference(name):
    fn, beta = PREFERENCE_OBJECTIVES[name]
    pc, pr, rc, rr, nc, nr = _inputs(1)
    loss, a, b = fn(rc, rr, rc, rr, nc, nr, beta, 0.0)  # policy == reference
    if name == "ipo":  # IPO's loss at the reference is (1 / (2 beta))^2 by its definition
        np.testing.assert_allclose(np.asarray(loss), (1 / (2 * beta)) ** 2, rtol=1e-6)
    elif name == "hinge":  # max(0, 1 - 0)
        np.testing.assert_allclose(np.asarray(loss), 1.0, rtol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(loss), np.log(2.0), rtol=1e-6)
    assert np.all(np.asarray(a) == 0) and np.all(np.asarray(b) == 0)


@pytest.mark.parametrize("name", sorted(PREFERENCE_OBJECTIVES))
def test_gradients_finite_for_one_token_and_very_long_responses(name):
    fn, beta = PREFERENCE_OBJECTIVES[name]
    cases = [  # (pi_c, pi_r, ref_c, ref_r, n_c, n_r)
        (-1e-9, -0.0, -0.0, -1e-12, 1.0, 1.0),  # a certain one-token response: NLL ~ 0
        (-2e4, -3e4, -2.1e4, -2.9e4, 8192.0, 8192.0),  # very long responses
        (-5.0, -4e4, -5.5, -3.9e4, 1.0, 8192.0),
    ]
    for c in cases:
        g = jax.grad(
            lambda pc, pr, c=c: fn(pc, pr, *map(jnp.float32, c[2:]), beta, 0.1)[0].sum(),
            argnums=(0, 1),
        )(jnp.float32(c[0]), jnp.float32(c[1]))
        assert all(np.isfinite(np.asarray(x)) for x in g), (name, c, g)


def test_reference_free_objectives_ignore_the_reference():
    assert {"simpo", "orpo"} <= REFERENCE_FREE and "hinge" not in REFERENCE_FREE
    args = _inputs(2)
    for name in ("simpo", "orpo"):
        fn, beta = PREFERENCE_OBJECTIVES[name]
        a = fn(*args, beta, 0.0)
        b = fn(args[0], args[1], 0 * args[2], 0 * args[3], args[4], args[5], beta, 0.0)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_simpo_margin_option_and_nll_term_in_pair_values():
    """`dpo.objective_args` reach the objective; `dpo.nll_weight` adds the chosen response's
    mean token NLL to each pair's loss (and logs it as TRL's nll_loss)."""
    from davir_jax.jobs.dpo import pair_values

    pc, pr, rc, rr, nc, nr = _inputs(3, n=8)
    nll = -np.stack([pc, pr], -1).reshape(1, 16)
    ref = -np.stack([rc, rr], -1).reshape(1, 16)
    cnt = np.stack([nc, nr], -1).reshape(1, 16)
    w = np.ones((1, 16), np.float32)
    beta = 2.0
    loss, aux, _ = pair_values("simpo", beta, 0.0, nll, ref, cnt, w, 0.0, {"gamma_beta_ratio": 0})
    a, b = beta * pc.astype(np.float64) / nc, beta * pr.astype(np.float64) / nr
    np.testing.assert_allclose(np.asarray(loss)[0], -_log_sigmoid(a - b), rtol=1e-5)
    plus, aux2, _ = pair_values("dpo", 0.1, 0.0, nll, ref, cnt, w, 0.5)
    base, _, _ = pair_values("dpo", 0.1, 0.0, nll, ref, cnt, w)
    chosen = -pc.astype(np.float64) / nc
    np.testing.assert_allclose(np.asarray(plus - base)[0], 0.5 * chosen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux2["nll_loss"]), chosen.sum(), rtol=1e-5)
    assert "nll_loss" not in aux


def test_objective_args_are_checked_against_the_objective():
    assert DPOConfig(objective="simpo", objective_args={"gamma_beta_ratio": 0.3})
    with pytest.raises(ValueError, match="objective_args.gamma: simpo takes gamma_beta_ratio"):
        DPOConfig(objective="simpo", objective_args={"gamma": 1.0})
    with pytest.raises(ValueError, match="objective_args.x: dpo takes no options"):
        DPOConfig(objective="dpo", objective_args={"x": 1.0})
    with pytest.raises(ValueError, match="nll_weight"):
        DPOConfig(nll_weight=-1.0)


# -- training ----------------------------------------------------------------------------------


def _pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = " ".join(rng.choice(PLAIN, 4))
        rows.append(
            {
                "prompt": p,
                "chosen": " " + " ".join(rng.choice(PLAIN, 3)),
                "rejected": " " + " ".join(rng.choice(PLAIN, int(rng.integers(2, 9)))),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, base, data, out="dpo", **kw) -> Config:
    return Config(
        model=ModelConfig(source=str(base)),
        data=DataConfig(
            path=str(data), cache_dir=str(tmp_path / "cache"), batch_rows=8, max_len=32
        ),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=1),
        train=TrainConfig(out=str(tmp_path / out), **{"epochs": 3, **kw.pop("train", {})}),
        dpo=DPOConfig(**{"eval_fraction": 0.2, **kw.pop("dpo", {})}),
    )


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "davir_dpo"])
def test_training_raises_margin_and_accuracy(tmp_path, base, objective):
    data = _pairs(tmp_path / "p.jsonl", 60)
    out = dpo(_cfg(tmp_path, base, data, dpo={"objective": objective}), progress=False)
    m = _metrics(out)
    assert m[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)  # the policy starts as the reference
    assert m[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    late = m[-3:]
    assert np.mean([r["rewards/margins"] for r in late]) > 0.1
    assert np.mean([r["rewards/accuracies"] for r in late]) > 0.8
    ev = json.loads((out / "eval.json").read_text())
    assert ev["objective"] == objective and ev["held_out"]["pairs"] > 0
    ho = ev["held_out"]
    if ho["pairs"] > 1:  # a 95% bootstrap interval over held-out pairs around the accuracy
        lo, hi = ho["accuracy_ci95"]
        assert 0.0 <= lo <= ho["accuracy"] <= hi <= 1.0
    assert set(m[0]) >= {
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "pairs",
    }


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_training_with_an_nll_term(tmp_path, base, objective):
    data = _pairs(tmp_path / "p.jsonl", 60)
    cfg = _cfg(tmp_path, base, data, dpo={"objective": objective, "nll_weight": 0.2})
    m = _metrics(dpo(cfg, progress=False))
    assert "nll_loss" in m[0] and m[0]["nll_loss"] > 0
    late = m[-3:]
    # Rewards are beta x mean token log-probs (ORPO's beta is 0.1): the margin's scale is beta's.
    margin = np.mean([r["rewards/margins"] for r in late])
    assert margin > max(m[0]["rewards/margins"], 0.0) + 0.05 * PREFERENCE_OBJECTIVES[objective][1]
    assert np.mean([r["loss"] for r in late]) < m[0]["loss"]


def test_precomputed_in_step_and_scored_reference_agree(tmp_path, base):
    from davir_jax.jobs.score import score

    data = _pairs(tmp_path / "p.jsonl", 24)
    cfg = _cfg(tmp_path, base, data, train={"max_steps": 4})
    pre = _metrics(dpo(cfg, progress=False))
    in_step = _metrics(
        dpo(
            dataclasses.replace(
                cfg,
                train=dataclasses.replace(cfg.train, out=str(tmp_path / "in")),
                dpo=dataclasses.replace(cfg.dpo, reference_in_step=True),
            ),
            progress=False,
        )
    )
    from davir_jax.config import ScoringConfig

    scored = score(
        dataclasses.replace(
            cfg,
            scoring=ScoringConfig(
                reference=str(base), out=str(tmp_path / "scores"), shard_batches=2
            ),
        ),
        progress=False,
    )
    import pyarrow.parquet as pq

    t = pq.read_table(scored / "scores.parquet").to_pylist()
    assert {r["example_id"].rsplit("/", 1)[1] for r in t} == {"chosen", "rejected"}
    assert all(r["nll_base"] is None and r["logp_ref"] == -r["nll_ref"] for r in t)
    from_scores = _metrics(
        dpo(
            dataclasses.replace(
                cfg,
                train=dataclasses.replace(cfg.train, out=str(tmp_path / "sc")),
                dpo=dataclasses.replace(cfg.dpo, reference_scores=str(scored)),
            ),
            progress=False,
        )
    )
    for other in (in_step, from_scores):
        assert [r["step"] for r in other] == [r["step"] for r in pre]
        np.testing.assert_allclose([r["loss"] for r in other], [r["loss"] for r in pre], rtol=1e-5)


def test_killed_and_resumed_dpo_equals_uninterrupted(tmp_path, base):
    data = _pairs(tmp_path / "p.jsonl", 80, seed=1)
    common = [
        "--model",
        str(base),
        "--data",
        str(data),
        f"--data.cache_dir={tmp_path / 'c'}",
        "--data.batch_rows=2",
        "--data.max_len=32",
        "--train.epochs=4",
        "--train.checkpoint_every=2",
        "--optimizer.lr=1e-3",
        "--objective",
        "davir_dpo",
        "-q",
    ]

    def cli(out):
        return run_cli("dpo", [*common, "--out", str(out)])

    full = cli(tmp_path / "full")
    assert full.wait(600) == 0, full.stdout.read().decode()
    out = tmp_path / "killed"
    proc = cli(out)
    ck, deadline = out / "checkpoints", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ck.is_dir() and any(p.name.isdigit() and int(p.name) >= 6 for p in ck.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = cli(out)
    assert again.wait(600) == 0, again.stdout.read().decode()
    a, b = _metrics(tmp_path / "full"), _metrics(out)
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["rewards/margins"] for r in b] == [r["rewards/margins"] for r in a]
