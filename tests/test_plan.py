"""`davir plan`: every shipped config plans on CPU with nothing allocated; the paper configs fit
their intended slices; a config that cannot fit is reported before any allocation."""

from __future__ import annotations

import gc
import pathlib

import jax
import pytest

from davir_jax.cli import main
from davir_jax.config import load_config
from davir_jax.jobs.plan import plan

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER = {  # config -> (job, devices)
    "llama2-7b-alpaca-6pct.yaml": ("sft", 32),
    "gemma-2b-alpaca-budgets.yaml": ("sft", 8),
    "alpaca-gsm8k-mixture.yaml": ("sft", 32),
    "zephyr-7b-davir-dpo.yaml": ("dpo", 8),
}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_plans_without_allocating(path):
    gc.collect()  # earlier tests' garbage must not vanish mid-test and hide an allocation
    before = len(jax.live_arrays())
    cfg = load_config(path)
    for job in ("sft", "score"):
        p = plan(cfg, job, chip=cfg.mesh.chip or "h100", devices=8)
        assert p["params"] > 0 and p["memory_total_bytes"] > p["memory_bytes"]["params"] > 0
        assert p["step_flops"] > 0 and p["fits"] in (True, False)
    gc.collect()
    assert len(jax.live_arrays()) == before


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_fit_their_slices(name):
    job, devices = PAPER[name]
    p = plan(load_config(CONFIGS / "paper" / name), job, devices=devices)
    assert p["fits"], p


def test_param_memory_is_the_sharded_share():
    cfg = load_config(CONFIGS / "models" / "llama2-7b.yaml", ["--mesh.fsdp=4"])
    p = plan(cfg, "sft", chip="v5p")
    # Every Llama parameter has an `embed` axis (on fsdp), and 4 divides them all.
    assert p["memory_bytes"]["params"] == 6_738_415_616 * 2 // 4
    assert p["memory_bytes"]["optimizer"] == 2 * p["memory_bytes"]["params"]


def test_a_config_that_cannot_fit_is_reported(capsys):
    gc.collect()  # earlier tests' garbage must not vanish mid-test and hide an allocation
    before = len(jax.live_arrays())
    rc = main(
        [
            "plan",
            "--config",
            str(CONFIGS / "models" / "llama2-7b.yaml"),
            "--chip",
            "v5e",
            "--mesh.fsdp=1",
            "--model.dtype=float32",
        ]
    )
    assert rc == 1 and "DOES NOT FIT" in capsys.readouterr().out
    gc.collect()
    assert len(jax.live_arrays()) == before


def test_a_batch_in_examples_or_tokens_plans_its_step_tokens():
    """A step of `batch_examples` holds at most one row per example (micro-batches of
    batch_rows); `batch_tokens` at most one row more than the tokens fill; FLOPs follow."""
    model = CONFIGS / "models" / "llama2-7b.yaml"
    rows = load_config(model, ["--data.batch_rows=2", "--data.max_len=512", "--train.grad_accum=3"])
    ex = load_config(
        model, ["--data.batch_rows=2", "--data.max_len=512", "--train.batch_examples=7"]
    )
    tok = load_config(
        model, ["--data.batch_rows=2", "--data.max_len=512", "--train.batch_tokens=2000"]
    )
    p_rows, p_ex, p_tok = (plan(c, "sft") for c in (rows, ex, tok))
    assert p_rows["tokens_per_step"] == 2 * 512 * 3
    assert p_ex["tokens_per_step"] == 8 * 512  # 7 rows -> 4 micro-batches of 2
    assert p_tok["tokens_per_step"] == 6 * 512  # ceil(2000 / 512) + 1 = 5 rows -> 3 x 2
    assert p_ex["step_flops"] / p_rows["step_flops"] == pytest.approx(8 / 6)
