"""Generation with a KV cache equals transformers' greedy `generate` token for token; sampling is
seeded and top-p behaves; `davir eval` reports held-out loss and exact-match accuracy; GSM8K
answers are extracted from real lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from davir_jax.data.answers import exact_correct, gsm8k_answer, gsm8k_correct
from davir_jax.models import load_model
from davir_jax.models.generation import generate


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_greedy_equals_transformers_generate(tmp_path, family):
    import torch
    from hf_models import make_hf_model

    hf = make_hf_model(family, tmp_path, seed=3)
    model = load_model(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 120, n).tolist() for n in (5, 11, 2)]
    ours = generate(model, prompts, 20)  # no EOS: all 20 tokens
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([p]),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )[0, len(p) :].tolist()
        assert got == want


def test_eos_stops_and_sampling_is_seeded(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("llama", tmp_path, seed=4)
    model = load_model(tmp_path)
    prompts = [[5, 6, 7], [9, 10]]
    greedy = generate(model, prompts, 12)
    eos = greedy[0][3]
    cut = generate(model, prompts, 12, [eos])
    assert cut[0] == greedy[0][: greedy[0].index(eos) + 1]
    a = generate(model, prompts, 12, temperature=1.0, seed=1)
    b = generate(model, prompts, 12, temperature=1.0, seed=1)
    c = generate(model, prompts, 12, temperature=1.0, seed=2)
    assert a == b and a != c
    # A tiny nucleus keeps only the most likely token: sampling then equals greedy.
    assert generate(model, prompts, 12, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_gsm8k_answers_on_real_lines(shared_data):
    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    first = rows[0]["answer"]
    assert first.rstrip().endswith("#### 18") and gsm8k_answer(first) == 18.0
    values = [gsm8k_answer(r["answer"]) for r in rows]
    assert all(v is not None for v in values)
    assert gsm8k_answer("#### 1,234") == 1234.0 and gsm8k_answer("so $5.50.") == 5.5
    assert gsm8k_correct("... the answer is 18", first) and not gsm8k_correct("17", first)
    assert gsm8k_correct("#### 18.0", first) and not gsm8k_correct("no number", first)
    sols = [
        json.loads(x)
        for x in (shared_data / "gsm8k" / "example_model_solutions.jsonl")
        .read_text()
        .splitlines()[:50]
    ]
    for r in sols:  # the file's own verdicts agree with our checker on its solutions
        for k, v in r.items():
            if isinstance(v, dict):
                assert gsm8k_correct(v["solution"], r["ground_truth"]) == v["is_correct"], (k, v)
    assert exact_correct(" The Paris. ", "paris") and not exact_correct("Lyon", "Paris")


def test_davir_eval_cli(tmp_path, capsys):
    from hf_models import make_hf_model
    from toy_tokenizers import word_tokenizer

    from davir_jax.cli import main

    make_hf_model("llama", tmp_path / "m", seed=0)
    word_tokenizer(True).save_pretrained(tmp_path / "m")
    rows = [
        {"question": "add two and three", "answer": "five #### 5"},
        {"question": "what is two", "answer": "two #### 2"},
    ]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        [
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--data",
            str(tmp_path / "g.jsonl"),
            "--out",
            str(tmp_path / "ev"),
            "--generate",
            "2",
            "--max-new-tokens",
            "5",
            f"--data.cache_dir={tmp_path / 'c'}",
            "-q",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["answer_check"] == "gsm8k" and res["n_generated"] == 2
    gens = [json.loads(x) for x in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    assert [g["reference"] for g in gens] == ["five #### 5", "two #### 2"]
    assert all(g["n_generated"] <= 5 for g in gens)
    # The reported loss is the token-weighted response NLL, as the scoring step computes it.
    from davir_jax.data.config import DataConfig
    from davir_jax.data.dataset import prepare
    from davir_jax.engine.nll import batch_nll

    data = prepare(
        DataConfig(path=str(tmp_path / "g.jsonl"), cache_dir=str(tmp_path / "c")),
        word_tokenizer(True),
        progress=False,
    )
    model = load_model(tmp_path / "m")
    tot = n = 0.0
    for _, b in data.batches(data.plans()):
        a, c = batch_nll(model, b, data.num_segments)
        tot, n = tot + a.sum(), n + c.sum()
    np.testing.assert_allclose(res["loss"], tot / n, rtol=1e-6)
    assert "accuracy" in capsys.readouterr().out


def test_davir_eval_refuses_batch_rows_that_do_not_split_over_the_devices(tmp_path, capsys):
    """Checked before anything loads, as in score/sft/dpo: 6 rows over the 8 test devices."""
    from davir_jax.cli import main

    args = ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "g.jsonl")]
    assert main(args + ["--out", str(tmp_path / "ev"), "--data.batch_rows=6", "-q"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_rows=6 must be a multiple of the data-parallel size 8" in err
    assert "mesh.cpu_devices" in err
