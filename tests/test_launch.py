"""launch/local.sh: two local processes (jax.distributed over gloo on 127.0.0.1, 4 CPU devices
each, one global mesh of 8) score a pool and run SFT steps with results equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from toy_tokenizers import WORDS, word_tokenizer

from davir_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
PLAIN = [w for w in WORDS if w.isalpha()]


@pytest.mark.slow
@pytest.mark.devices(8)
def test_two_local_processes_equal_one(tmp_path):
    import sys

    from hf_models import make_hf_model

    for name, seed in (("base", 0), ("ref", 1)):
        make_hf_model("llama", tmp_path / name, seed=seed)
        word_tokenizer(True).save_pretrained(tmp_path / name)
    rng = np.random.default_rng(0)
    rows = [
        {"prompt": " ".join(rng.choice(PLAIN, 4)), "response": " ".join(rng.choice(PLAIN, 5))}
        for _ in range(40)
    ]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def args(cache: str, tag: str) -> tuple[list[str], list[str]]:
        common = [
            f"--data.cache_dir={tmp_path / cache}",
            "--data.batch_rows=8",
            "--data.max_len=32",
            "-q",
        ]
        score = [
            "score",
            "--data",
            str(pool),
            "--base",
            str(tmp_path / "base"),
            "--reference",
            str(tmp_path / "ref"),
            "--out",
            str(tmp_path / f"scores-{tag}"),
            *common,
        ]
        sft = [
            "sft",
            "--model",
            str(tmp_path / "base"),
            "--data",
            str(pool),
            "--out",
            str(tmp_path / f"sft-{tag}"),
            "--train.max_steps=3",
            "--optimizer.lr=1e-3",
            "--train.checkpoint_every=2",
            *common,
        ]
        return score, sft

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    for cmd in args("c2", "two"):
        proc = subprocess.run(
            ["bash", "launch/local.sh", "2", sys.executable, "-m", "davir_jax.cli", *cmd],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for cmd in args("c1", "one"):  # one process, 8 fake devices: the same global mesh
        assert main(cmd) == 0
    one = {
        r["example_id"]: r
        for r in pq.read_table(tmp_path / "scores-one/scores.parquet").to_pylist()
    }
    two = {
        r["example_id"]: r
        for r in pq.read_table(tmp_path / "scores-two/scores.parquet").to_pylist()
    }
    assert one.keys() == two.keys() and len(one) == 40
    for k in one:
        np.testing.assert_allclose(two[k]["nll_base"], one[k]["nll_base"], rtol=1e-5)
        np.testing.assert_allclose(two[k]["nll_ref"], one[k]["nll_ref"], rtol=1e-5)

    def losses(tag):
        text = (tmp_path / f"sft-{tag}" / "metrics.jsonl").read_text()
        return [json.loads(x)["loss"] for x in text.splitlines()]

    assert len(losses("two")) == 3
    np.testing.assert_allclose(losses("two"), losses("one"), rtol=1e-5)
    assert (tmp_path / "sft-two" / "model" / "davir_model.json").is_file()
