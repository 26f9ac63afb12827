"""`data.eos_in_loss`: with it off, the EOS stays in the ids but leaves the loss mask (exactly one
fewer loss token per example, at the EOS); scores then equal a transformers PyTorch sum over the
response tokens without the EOS; the token cache and the scoring run never mix the two."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from toy_tokenizers import WORDS, word_tokenizer

from davir_jax.config import Config, ScoringConfig, load_config
from davir_jax.core.runs import MixedRunError
from davir_jax.data.config import DataConfig
from davir_jax.data.dataset import prepare, store_fields
from davir_jax.data.readers import read_examples
from davir_jax.data.skips import SkipLog
from davir_jax.data.templates import Encoder
from davir_jax.jobs.score import score
from davir_jax.models.config import ModelConfig

PLAIN_WORDS = [w for w in WORDS if w.isalpha()]


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    pick = lambda k: " ".join(rng.choice(PLAIN_WORDS, k))  # noqa: E731
    return [
        {"prompt": pick(rng.integers(2, 12)), "response": pick(rng.integers(1, 16))}
        for _ in range(n)
    ]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_default_is_on_and_the_override_parses():
    assert DataConfig().eos_in_loss is True
    assert load_config(overrides=["--data.eos_in_loss=false"]).data.eos_in_loss is False


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize("template", ["plain", "alpaca", "chat"])
def test_mask_loses_exactly_the_eos(tmp_path, bos, template):
    tok = word_tokenizer(bos)
    rows = [
        {"instruction": "add two and three", "input": "", "output": "five"},
        {"instruction": "add two", "input": "three", "output": "the answer is five"},
        {"instruction": "how are you", "input": "", "output": "i am fine"},
    ]
    examples = list(read_examples(_write(tmp_path / "d.jsonl", rows), "alpaca"))
    on = Encoder(tok, template, 512).encode(examples, SkipLog())
    off = Encoder(tok, template, 512, eos_in_loss=False).encode(examples, SkipLog())
    for a, b in zip(on, off):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.input_ids, b.input_ids)  # the sequence is unchanged
        assert a.input_ids[-1] == tok.eos_token_id
        diff = np.flatnonzero(a.loss_mask != b.loss_mask)
        assert diff.tolist() == [len(a.input_ids) - 1]  # only the EOS position differs
        assert a.loss_mask[-1] == 1 and b.loss_mask[-1] == 0
        assert b.n_tokens == a.n_tokens - 1 >= 1


def test_cache_keeps_the_two_apart(tmp_path):
    tok = word_tokenizer(True)
    path = _write(tmp_path / "pool.jsonl", _rows(12))
    on = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_len=64)
    off = DataConfig(**{**on.__dict__, "eos_in_loss": False})
    assert store_fields(on, tok)["eos_in_loss"] is True
    assert store_fields(off, tok)["eos_in_loss"] is False
    d_on = prepare(on, tok, progress=False)  # built first: a shared key would return it below
    d_off = prepare(off, tok, progress=False)
    assert d_on.directory != d_off.directory
    for (ids_a, m_a), (ids_b, m_b) in zip(d_on.get(list(range(12))), d_off.get(list(range(12)))):
        np.testing.assert_array_equal(ids_a, ids_b)
        assert m_a[-1] == 1 and m_b[-1] == 0 and m_b.sum() == m_a.sum() - 1
    np.testing.assert_array_equal(d_off.n_response_tokens(), d_on.n_response_tokens() - 1)
    # Reopened from the cache, each config still gets its own tokens.
    again = prepare(off, tok, progress=False)
    assert again.directory == d_off.directory and all(m[-1] == 0 for _, m in again.get([0, 5]))


def test_preference_pairs_drop_eos_on_both_sides(tmp_path):
    tok = word_tokenizer(True)
    rows = [
        {"prompt": r["prompt"], "chosen": r["response"], "rejected": s["response"]}
        for r, s in zip(_rows(6, 1), _rows(6, 2))
    ]
    path = _write(tmp_path / "pairs.jsonl", rows)
    base = dict(path=str(path), cache_dir=str(tmp_path / "cache"), max_len=64)
    on = prepare(DataConfig(**base), tok, progress=False, pairs=True)
    off = prepare(DataConfig(**base, eos_in_loss=False), tok, progress=False, pairs=True)
    assert len(off) == 12 and on.directory != off.directory
    for (ids_a, m_a), (ids_b, m_b) in zip(on.get(list(range(12))), off.get(list(range(12)))):
        np.testing.assert_array_equal(ids_a, ids_b)
        assert ids_b[-1] == tok.eos_token_id and m_a[-1] == 1 and m_b[-1] == 0
        assert m_b.sum() == m_a.sum() - 1


def _cfg(tmp_path, root, path, eos_in_loss: bool, out: str) -> Config:
    data = DataConfig(
        path=str(path),
        cache_dir=str(tmp_path / "cache"),
        batch_rows=8,
        max_len=64,
        eos_in_loss=eos_in_loss,
    )
    scoring = ScoringConfig(
        base=str(root / "base"), reference=str(root / "reference"), out=str(tmp_path / out)
    )
    return Config(model=ModelConfig(), data=data, scoring=scoring)


def _torch_token_nll(model, tok, prompt: str, response: str) -> tuple[np.ndarray, int]:
    """NLL of every token after the prompt (the response tokens, then the EOS), float64."""
    import torch

    p = tok(prompt)["input_ids"]
    ids = p + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return np.array([-float(lp[t - 1, ids[t]]) for t in range(len(p), len(ids))]), len(p)


def test_scores_equal_pytorch_without_eos_and_runs_are_not_mixed(tmp_path, models):
    import pyarrow.parquet as pq

    root, hf, tok = models
    rows = _rows(20)
    path = _write(tmp_path / "pool.jsonl", rows)
    tables = {}
    for flag in (True, False):
        out = score(_cfg(tmp_path, root, path, flag, f"out-{flag}"), progress=False)
        tables[flag] = {
            r["example_id"]: r for r in pq.read_table(out / "scores.parquet").to_pylist()
        }
        run = json.loads((out / "run.json").read_text())
        assert run["data"]["eos_in_loss"] is flag
    for i, row in enumerate(rows):
        on, off = tables[True][f"pool:{i}"], tables[False][f"pool:{i}"]
        for m, col in (("base", "nll_base"), ("reference", "nll_ref")):
            tok_nll, _ = _torch_token_nll(hf[m], tok, row["prompt"], row["response"])
            # Off: the response tokens only (all but the last, the EOS); on: all of them.
            assert off["n_tokens"] == len(tok_nll) - 1 and on["n_tokens"] == len(tok_nll)
            np.testing.assert_allclose(off[col], tok_nll[:-1].sum(), rtol=1e-4)
            np.testing.assert_allclose(on[col], tok_nll.sum(), rtol=1e-4)
    # The option is part of the run's identity: the off run's directory refuses the on config.
    with pytest.raises(MixedRunError, match="different data"):
        score(_cfg(tmp_path, root, path, True, "out-False"), progress=False)
