"""Batch size as researchers state it: `train.batch_examples` steps hold exactly that many
examples (SFT and DPO, one shared planner), `train.batch_tokens` steps are as close to the token
target as whole examples allow, steps of different row counts share one compiled step, and the
loss is the mean over the step's response tokens (a PyTorch oracle); a run of fewer than
`train.min_steps` steps says so, and --strict refuses it before writing anything."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import _data

from davir_jax.config import Config, DPOConfig, load_config
from davir_jax.core.errors import UserError
from davir_jax.core.schema import ConfigError
from davir_jax.core.sharding import make_mesh
from davir_jax.data.config import DataConfig
from davir_jax.engine.config import OptimizerConfig, TrainConfig
from davir_jax.engine.trainer import plan_steps
from davir_jax.jobs.sft import sft
from davir_jax.models.config import ModelConfig


def _one_device():
    return make_mesh(1, 1, 1, jax.devices()[:1])


def _cfg(tmp_path, base, data, out="run", train=None, optimizer=None, rows=2) -> Config:
    return Config(
        model=ModelConfig(source=str(base)),
        data=DataConfig(
            path=str(data),
            cache_dir=str(tmp_path / "cache"),
            batch_rows=rows,
            max_len=32,
        ),
        optimizer=OptimizerConfig(**{"lr": 1e-3, "warmup_steps": 1, **(optimizer or {})}),
        train=TrainConfig(out=str(tmp_path / out), **(train or {})),
    )


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _prepared(cfg: Config):
    from davir_jax.data.dataset import prepare
    from davir_jax.models.loading import load_tokenizer_for

    return prepare(cfg.data, load_tokenizer_for(cfg.model.source), progress=False)


def _items(step) -> list[int]:
    return [i for p in step for row in p.rows for i in row]


def _hf_example_nll(base: Path, data) -> tuple[np.ndarray, np.ndarray]:
    """Every example's summed response NLL and response-token count under the PyTorch model
    (the independent oracle): token t counts when loss_mask[t] (predicted from t - 1)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    nll, cnt = np.zeros(len(data)), np.zeros(len(data))
    for i, (ids, mask) in enumerate(data.get(list(range(len(data))))):
        with torch.no_grad():
            logits = hf(torch.tensor(np.asarray(ids)[None])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1).numpy()
        tok = np.asarray(ids)[1:]
        per = -logp[np.arange(len(tok)), tok]
        m = np.asarray(mask)[1:].astype(bool)
        nll[i], cnt[i] = per[m].sum(), m.sum()
    return nll, cnt


def test_batch_examples_steps_one_compile_and_the_loss_oracle(tmp_path, base, monkeypatch):
    """40 examples, batch_examples=12, 2 epochs: steps of 12, 12, 12, 4 examples (the remainder
    is kept, not dropped), one compiled step for all, and every step's loss is the mean over its
    response tokens. The learning rate is so small that no parameter moves (Adam's update,
    ~lr, is below float32 spacing), so every step's loss is the starting model's."""
    import davir_jax.engine.trainer as train_mod

    steps_fns = []
    real = train_mod.make_train_step

    def spy(*a, **k):
        fn = real(*a, **k)
        steps_fns.append(fn)
        return fn

    monkeypatch.setattr(train_mod, "make_train_step", spy)
    data = _data(tmp_path / "d.jsonl", 40, seed=4)
    cfg = _cfg(
        tmp_path,
        base,
        data,
        train={"epochs": 2, "batch_examples": 12, "checkpoint_every": 1000},
        optimizer={"lr": 1e-12, "schedule": "constant", "warmup_steps": 0},
    )
    out = sft(cfg, False, _one_device())
    prepared = _prepared(cfg)
    plan = plan_steps(prepared.lengths, cfg.data, cfg.train, cfg.seed)
    # From the plan: exactly 12 per step, the epoch's last step the remainder; every example
    # once per epoch.
    for epoch in plan.epochs:
        assert [len(_items(s)) for s in epoch] == [12, 12, 12, 4]
        assert sorted(i for s in epoch for i in _items(s)) == list(range(40))
    # From the run's metrics: the same counts.
    m = _metrics(out)
    seen = np.diff([0] + [r["examples_seen"] for r in m])
    assert seen.tolist() == [12, 12, 12, 4] * 2
    # Steps of different real row counts, one accumulation count, one compilation.
    rows = [sum(1 for p in s for r in p.rows if r) for e in plan.epochs for s in e]
    assert len(set(rows)) > 1 and all(len(s) == plan.accum for e in plan.epochs for s in e)
    assert plan.accum > 1
    (fn,) = steps_fns
    assert fn._cache_size() == 1
    # The loss of each step: the oracle's summed NLL over the step's response tokens divided
    # by their count (not a mean of micro-batch or example means).
    nll, cnt = _hf_example_nll(base, prepared)
    want = [nll[_items(s)].sum() / cnt[_items(s)].sum() for e in plan.epochs for s in e]
    np.testing.assert_allclose([r["loss"] for r in m], want, rtol=2e-5)
    np.testing.assert_array_equal(
        [r["tokens"] for r in m], [cnt[_items(s)].sum() for e in plan.epochs for s in e]
    )
    # The plan's description and steps.json (for the pipeline report).
    steps = json.loads((out / "steps.json").read_text())
    assert steps["total_steps"] == 8 and steps["steps_per_epoch"] == [4, 4]
    assert steps["batch"] == "12 examples per step" and steps["below_min_steps"] is True


def test_batch_tokens_steps_are_within_one_example_of_the_target():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 500)
    data = DataConfig(batch_rows=4, max_len=64)
    for target in (100, 777, 2048):
        tc = TrainConfig(epochs=2, batch_tokens=target)
        plan = plan_steps(lengths, data, tc, seed=3)
        for e, epoch in enumerate(plan.epochs):
            # Steps are consecutive runs of the epoch's permutation (seed * 100_003 + epoch).
            order = np.random.default_rng(3 * 100_003 + e).permutation(500).tolist()
            pos = {x: j for j, x in enumerate(order)}
            items = [sorted(_items(s), key=pos.get) for s in epoch]
            assert [i for it in items for i in it] == order  # none dropped, none repeated
            for k, it in enumerate(items):
                tokens = int(lengths[it].sum())
                # The epoch's last step holds what is left: at most the target, plus one.
                assert tokens - target <= lengths.max()
                if k < len(items) - 1:
                    assert abs(tokens - target) <= lengths.max()
                    # Whole examples, as close as they allow: one more (the next step's first)
                    # would be farther, one fewer (the last added) no closer.
                    nxt = int(lengths[items[k + 1][0]])
                    assert abs(tokens - target) < abs(tokens + nxt - target)
                    if len(it) > 1:
                        assert abs(tokens - target) <= abs(tokens - int(lengths[it[-1]]) - target)
            assert len({len(s) for s in epoch}) == 1 and len(epoch[0]) == plan.accum
    # Epochs shuffle differently (the seed rule seed * 100_003 + epoch).
    plan = plan_steps(lengths, data, TrainConfig(epochs=2, batch_examples=50), seed=1)
    assert _items(plan.epochs[0][0]) != _items(plan.epochs[1][0])
    assert plan_steps(lengths, data, TrainConfig(epochs=2, batch_examples=50), seed=1) == plan


def test_unsized_batch_is_the_row_batch_of_before():
    """Without batch_examples/tokens a step is grad_accum packed batches, as before: the epoch's
    packed plans grouped in order, the last step completed with empty batches."""
    from davir_jax.data.dataset import make_plans

    lengths = np.random.default_rng(2).integers(3, 30, 200)
    data = DataConfig(batch_rows=2, max_len=32)
    plan = plan_steps(lengths, data, TrainConfig(epochs=2, grad_accum=3), seed=5)
    for e, epoch in enumerate(plan.epochs):
        want = make_plans(lengths, data, shuffle=True, seed=5 * 100_003 + e)
        flat = [p for s in epoch for p in s]
        assert flat[: len(want)] == want
        assert all(not any(p.rows) for p in flat[len(want) :]) and len(flat) % 3 == 0
    assert plan.batch == "6 rows of 32 tokens per step"


def test_batch_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(batch_examples=8, batch_tokens=100)
    with pytest.raises(ValueError, match="grad_accum: 4 with train.batch_examples"):
        TrainConfig(batch_examples=8, grad_accum=4)
    with pytest.raises(ValueError, match="batch_tokens: must be positive"):
        TrainConfig(batch_tokens=0)
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  batch_examples: 128\n  batch_tokens: 4096\n")
    with pytest.raises(ConfigError, match="batch_tokens"):
        load_config(str(y))


def test_a_run_with_another_batch_is_refused(tmp_path, base):
    from davir_jax.core.runs import MixedRunError

    data = _data(tmp_path / "d.jsonl", 20)
    cfg = _cfg(tmp_path, base, data, train={"batch_examples": 6, "max_steps": 1})
    sft(cfg, False, _one_device())
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_examples=5))
    with pytest.raises(MixedRunError, match="train"):
        sft(other, False, _one_device())


def test_dpo_steps_come_from_the_shared_planner(tmp_path, base):
    from test_preference import _pairs

    from davir_jax.jobs.dpo import PairData, dpo

    pairs = _pairs(tmp_path / "p.jsonl", 30, seed=2)
    cfg = dataclasses.replace(
        _cfg(tmp_path, base, pairs, train={"epochs": 2, "batch_examples": 7}),
        dpo=DPOConfig(objective="dpo", eval_fraction=0.2),
    )
    out = dpo(cfg, False, _one_device())
    from davir_jax.data.dataset import prepare
    from davir_jax.models.loading import load_tokenizer_for

    data = prepare(cfg.data, load_tokenizer_for(str(base)), progress=False, pairs=True)
    train_pairs, _ = PairData(data).split(0.2)
    n = len(train_pairs)
    plan = plan_steps(train_pairs.lengths, train_pairs.cfg, cfg.train, cfg.seed, "pairs")
    want = [len(_items(s)) for e in plan.epochs for s in e]
    assert want == ([7] * (n // 7) + ([n % 7] if n % 7 else [])) * 2
    m = _metrics(out)
    assert np.diff([0] + [r["examples_seen"] for r in m]).tolist() == want
    assert [r["pairs"] for r in m] == want  # the step's pairs reached the objective


def test_few_steps_warn_and_strict_refuses_before_writing(tmp_path, base, capsys):
    data = _data(tmp_path / "d.jsonl", 40)
    cfg = _cfg(tmp_path, base, data, train={"epochs": 3}, rows=8)
    out = sft(cfg, False, _one_device())
    err = capsys.readouterr().err
    steps = json.loads((out / "steps.json").read_text())
    n = steps["total_steps"]
    assert 1 <= n < 20
    line = (
        f"davir sft: this run takes {n} optimizer steps (40 examples, 3 epochs, 8 rows of 32 "
        "tokens per step); fewer than train.min_steps=20: set train.batch_examples or more epochs"
    )
    assert line in err.splitlines()
    assert steps["below_min_steps"] is True and steps["min_steps"] == 20
    # Enough steps: no warning.
    ok = _cfg(tmp_path, base, data, out="ok", train={"epochs": 3, "min_steps": n}, rows=8)
    sft(ok, False, _one_device())
    assert "fewer than train.min_steps" not in capsys.readouterr().err
    # Strict: an error before any output is written (the directory keeps only its lock).
    strict = _cfg(
        tmp_path, base, data, out="strict", train={"epochs": 3, "strict_steps": True}, rows=8
    )
    with pytest.raises(UserError, match=f"this run takes {n} optimizer steps"):
        sft(strict, False, _one_device())
    left = (
        [p.name for p in (tmp_path / "strict").iterdir()] if (tmp_path / "strict").exists() else []
    )
    assert left in ([], [".davir.lock"])
    # The CLI's --strict sets both data.strict and train.strict_steps.
    from davir_jax.cli import main

    rc = main(
        [
            "sft",
            "--model",
            str(base),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "cli"),
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.max_len=32",
            "--data.batch_rows=8",
            "--strict",
            "-q",
        ]
    )
    assert rc == 2
    assert "fewer than train.min_steps=20" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "run.json").exists()
