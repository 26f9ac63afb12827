"""The MFU benchmarks run end to end (a tiny config, one iteration, each attention
implementation, packed rows): a benchmark that no longer imports or runs is caught here, not on
the accelerator that was booked to run it. Their figures are not checked: no timed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,extra",
    [
        ("forward_mfu.py", ["--batch", "2", "--dtype", "float32", "--attention", "dense,splash"]),
        ("train_mfu.py", ["--rows", "2", "--remat", "dots", "--attention", "blocked,splash"]),
    ],
)
def test_mfu_benchmark_runs_each_attention_implementation(script, extra, tmp_path):
    out = tmp_path / "res.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run on a laptop
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--preset", "configs/tiny.yaml"]
    cmd += ["--seq", "128", "--segments", "3", "--iters", "1", "--out", str(out)]
    cmd += extra
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["attention"] for x in rows] == extra[-1].split(",")
    assert all(x["segments"] == 3 and x["tokens_per_s"] > 0 for x in rows)
    if script == "train_mfu.py":  # the same step, whichever attention: the same loss
        losses = [x["loss"] for x in rows]
        assert max(losses) - min(losses) < 1e-2, losses
