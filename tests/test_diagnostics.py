"""Length-correlation diagnostics: files, scipy-equal correlations, the paper's direction."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from davir_jax.reports.diagnostics import length_correlations, preview, write_diagnostics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _length_biased_table(n: int = 400, seed: int = 0) -> pa.Table:
    """rho = Lb * d grows with T (Lb is T times a per-token loss); davir = d is drawn
    independently of T, as the paper reports for real data."""
    rng = np.random.default_rng(seed)
    t = rng.integers(5, 400, n)
    lb = t * rng.uniform(1.5, 2.5, n)
    d = rng.uniform(0.1, 0.5, n)
    records = [
        json.dumps({"instruction": f"task {i} |", "output": "w " * int(t[i])}) for i in range(n)
    ]
    return pa.table(
        {
            "example_id": [f"s:{i}" for i in range(n)],
            "source": ["s"] * n,
            "row": pa.array(range(n), pa.int64()),
            "content_hash": [f"h{i}" for i in range(n)],
            "n_tokens": pa.array(t, pa.int64()),
            "nll_base": lb,
            "nll_ref": lb * (1 - d),
            "record": records,
        }
    )


@pytest.fixture
def scores_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    pq.write_table(_length_biased_table(), d / "scores.parquet")
    (d / "manifest.json").write_text(
        json.dumps({"data": {"path": "x.jsonl"}, "template": "alpaca", "fingerprints": {"a": 1}})
    )
    return d


def test_writes_files_next_to_scores_with_scipy_correlations(scores_dir, capsys):
    res = write_diagnostics(scores_dir, k=3)
    names = {p.name for p in scores_dir.iterdir()}
    assert {
        "diagnostics.json",
        "diagnostics.md",
        "diagnostics_hist.png",
        "diagnostics_vs_length.png",
    } <= names
    assert not any(n.startswith(".") for n in names)  # no temp files left behind
    for png in ("diagnostics_hist.png", "diagnostics_vs_length.png"):
        assert (scores_dir / png).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((scores_dir / "diagnostics.json").read_text()) == res

    tab = pq.read_table(scores_dir / "scores.parquet")
    lb, lr = np.array(tab["nll_base"].to_pylist()), np.array(tab["nll_ref"].to_pylist())
    t = np.array(tab["n_tokens"].to_pylist())
    for name, score in {"rho": lb - lr, "davir": (lb - lr) / lb, "loss_ref": lr / t}.items():
        c = res["scores"][name]
        assert c["n"] == 400
        assert c["spearman"] == pytest.approx(stats.spearmanr(score, t).statistic, abs=1e-12)
        assert c["pearson"] == pytest.approx(stats.pearsonr(score, t).statistic, abs=1e-12)
    # The paper's direction: rho tracks length, davir does not.
    sp_rho, sp_davir = res["scores"]["rho"]["spearman"], res["scores"]["davir"]["spearman"]
    assert sp_rho > 0.8 and abs(sp_davir) < 0.15 and sp_rho > sp_davir + 0.5

    md = (scores_dir / "diagnostics.md").read_text()
    assert "| score | Spearman vs length | Pearson vs length | n |" in md
    assert f"| `rho` | {sp_rho:+.3f} |" in md
    assert "](diagnostics_hist.png)" in md and "](diagnostics_vs_length.png)" in md
    # A '|' inside a preview is escaped so it cannot split the Markdown table.
    assert "\\| =>" in md and " | =>" not in md
    assert "| `davir` |" in capsys.readouterr().out
    assert res["inputs"]["fingerprints"] == {"a": 1}
    assert len(res["inputs"]["scores_sha256"]) == 64


def test_top_and_bottom_examples(scores_dir):
    res = write_diagnostics(scores_dir, names=["davir", "rho"], k=4, echo=False)
    assert list(res["scores"]) == ["davir", "rho"]
    tab = pq.read_table(scores_dir / "scores.parquet")
    lb, lr = np.array(tab["nll_base"].to_pylist()), np.array(tab["nll_ref"].to_pylist())
    ids = tab["example_id"].to_pylist()
    d = (lb - lr) / lb
    order = sorted(range(len(ids)), key=lambda i: (-d[i], ids[i]))
    assert [e["example_id"] for e in res["top"]["davir"]] == [ids[i] for i in order[:4]]
    low = sorted(range(len(ids)), key=lambda i: (d[i], ids[i]))[:4]
    assert [e["example_id"] for e in res["bottom"]["davir"]] == [ids[i] for i in low]
    e = res["top"]["davir"][0]
    assert e["n_tokens"] == tab["n_tokens"][order[0]].as_py()
    assert e["preview"].startswith(f"task {order[0]} | =>") and e["preview"].endswith("…")


def test_table_input_needs_out_dir(tmp_path):
    tab = _length_biased_table(50)
    with pytest.raises(ValueError, match="out_dir is required"):
        write_diagnostics(tab)
    res = write_diagnostics(tab, tmp_path / "diag", names=["random"], k=100, echo=False)
    assert res["k"] == 50 and res["inputs"] == {}
    assert (tmp_path / "diag" / "diagnostics_hist.png").read_bytes()[:8] == PNG_MAGIC


def test_constant_score_has_no_correlation():
    c = length_correlations(np.ones(10), np.arange(10))
    assert c == {"n": 10, "spearman": None, "spearman_p": None, "pearson": None, "pearson_p": None}


def test_preview_handles_other_formats():
    assert preview('{"question": "1+1?", "answer": "2"}') == "1+1? => 2"
    assert preview("not json") == "not json"
    assert preview('{"text": "abc"}') == '{"text": "abc"}'
