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


# -- `davir plan --compile`: the real step, compiled from abstract shapes ------------------------


def _batch_bytes(c: dict, devices_over_batch: int) -> int:
    """Per-device bytes of the step's batch: four int32 token arrays and the float32 weights."""
    b = c["batch"]
    rows = b["micro_batches"] * b["rows"] // devices_over_batch
    return rows * (4 * b["seq"] + b["segments"]) * 4


@pytest.mark.parametrize(
    "mesh,over_batch", [((2, 2, 2), 4), ((1, 8, 1), 8)], ids=["2x2x2", "fsdp8"]
)
def test_compiled_sft_step_holds_exactly_the_planned_shards(mesh, over_batch):
    """XLA's argument bytes per device equal the rules table's parameter shard, its two AdamW
    moments and the batch rows of one device (plus the optimizer's step counters): the
    shardings the step declares are the ones `plan` computes."""
    from davir_jax.jobs.aot import compile_step

    data, fsdp, tensor = mesh
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [f"--mesh.data={data}", f"--mesh.fsdp={fsdp}", f"--mesh.tensor={tensor}"],
    )
    c = compile_step(cfg, "sft")
    assert c["devices"] == 8 and c["mesh"] == {"data": data, "fsdp": fsdp, "tensor": tensor}
    x, est = c["xla"], c["estimate_bytes"]
    state = est["params"] + est["optimizer"]
    assert 0 <= x["argument_bytes"] - state - _batch_bytes(c, over_batch) <= 64
    # The training state is donated: the new state reuses its buffers.
    assert x["alias_bytes"] >= state
    assert x["temp_bytes"] > 0 and x["peak_bytes"] >= x["argument_bytes"]


def test_dpo_and_score_steps_compile_and_cli_reports_them(capsys):
    import json

    from davir_jax.jobs.aot import compile_step

    cfg = load_config(CONFIGS / "tiny.yaml", ["--mesh.data=2", "--mesh.fsdp=4"])
    dpo = compile_step(cfg, "dpo")
    assert dpo["batch"]["segments"] == 2 * cfg.data.max_segments  # whole pairs per row
    score = compile_step(cfg, "score")
    # Scoring holds one model's parameter shards and its token rows; no optimizer state.
    rows = cfg.data.batch_rows // 8
    one_model = plan(cfg, "sft", devices=8)["memory_bytes"]["params"]
    tokens = rows * 4 * score["batch"]["seq"] * 4
    assert score["xla"]["argument_bytes"] == one_model + tokens
    assert main(["plan", "--config", str(CONFIGS / "tiny.yaml"), "--compile", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compiled"]["xla"]["peak_bytes"] > 0 and out["compiled"]["job"] == "sft"
