"""Models that cannot give finite losses are refused, never trained, scored or evaluated into
NaN outputs: a tokenizer whose ids do not fit the model's vocabulary is refused when the two are
loaded together (every job), and a NaN or infinite loss stops SFT, DPO, scoring and evaluation at
the step that produced it, naming the examples, with no final model or complete table written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from toy_tokenizers import WORDS, vocab, word_tokenizer

from davir_jax.config import Config, DPOConfig, EvalConfig, PipelineConfig, ScoringConfig
from davir_jax.data.config import DataConfig
from davir_jax.engine.config import OptimizerConfig, TrainConfig
from davir_jax.engine.nll import NonFiniteLossError
from davir_jax.models.config import ModelConfig
from davir_jax.models.loading import TokenizerMismatchError, load_tokenizer_for

# Words of the data; "five" is kept out and put into chosen prompts only.
PLAIN = [w for w in WORDS if w.isalpha() and w != "five"]
POISON = "five"
BAD_ROWS = (3, 10)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    """The tiny Llama of the `base` fixture with a NaN input embedding for one word: exactly the
    examples whose text holds that word get a NaN loss (the LM head, untied, stays finite)."""
    import torch
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("nan_model")
    model = make_hf_model("llama", d, seed=0)
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        model.model.embed_tokens.weight[vocab()[POISON]] = float("nan")
    model.save_pretrained(d)
    word_tokenizer(True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> Path:
    """A model with 32 embeddings, fewer than the word tokenizer's ids, with that tokenizer saved
    in (as SmolLM2's 49,152-id tokenizer next to a 128-entry model)."""
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("small_vocab")
    make_hf_model("llama", d, seed=0, vocab_size=32)
    word_tokenizer(True).save_pretrained(d)
    return d


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n):
        prompt = list(rng.choice(PLAIN, 4))
        if r in BAD_ROWS:
            prompt[1] = POISON
        rows.append({"prompt": " ".join(prompt), "response": " " + " ".join(rng.choice(PLAIN, 3))})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, model: Path, data: Path, **sections) -> Config:
    # One padded row per example (pack=False): a NaN cannot spread to other examples of a row,
    # so the examples named are exactly the poisoned ones. 16 rows: one batch holds them all.
    dc = DataConfig(
        path=str(data),
        cache_dir=str(tmp_path / "cache"),
        batch_rows=16,
        max_len=32,
        pack=False,
    )
    return Config(model=ModelConfig(source=str(model)), data=dc, **sections)


def _named(err: pytest.ExceptionInfo, source: str) -> set[str]:
    return set(re.findall(rf"{source}:\d+(?:/chosen|/rejected)?", str(err.value)))


# -- the tokenizer against the model -----------------------------------------------------------


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tmp_path, small_vocab, base):
    from davir_jax.jobs.dpo import dpo
    from davir_jax.jobs.evaluate import run_eval
    from davir_jax.jobs.pipeline import run_pipeline
    from davir_jax.jobs.score import score
    from davir_jax.jobs.sft import sft

    n_ids = len(word_tokenizer(True))
    assert n_ids > 32
    with pytest.raises(TokenizerMismatchError) as e:
        load_tokenizer_for(small_vocab)
    msg = str(e.value)
    assert f"has {n_ids} ids" in msg and "vocab_size 32" in msg and str(small_vocab) in msg

    data = _write(tmp_path / "d.jsonl", _rows(16))
    pairs = _write(
        tmp_path / "p.jsonl",
        [{"prompt": r["prompt"], "chosen": r["response"], "rejected": " a"} for r in _rows(8)],
    )
    jobs = {
        "sft": lambda: sft(
            _cfg(tmp_path, small_vocab, data, train=TrainConfig(out=str(tmp_path / "s")))
        ),
        "eval": lambda: run_eval(
            _cfg(tmp_path, small_vocab, data, eval=EvalConfig(out=str(tmp_path / "e")))
        ),
        "dpo": lambda: dpo(
            _cfg(tmp_path, small_vocab, pairs, train=TrainConfig(out=str(tmp_path / "o")))
        ),
        # The base's tokenizer fits the base but not the reference it is paired with.
        "score": lambda: score(
            _cfg(
                tmp_path,
                base,
                data,
                scoring=ScoringConfig(
                    base=str(base), reference=str(small_vocab), out=str(tmp_path / "sc")
                ),
            )
        ),
        "dpo reference": lambda: dpo(
            _cfg(
                tmp_path,
                base,
                pairs,
                train=TrainConfig(out=str(tmp_path / "o2")),
                dpo=DPOConfig(reference=str(small_vocab)),
            )
        ),
        "pipeline": lambda: run_pipeline(
            _cfg(tmp_path, small_vocab, data, pipeline=PipelineConfig(out=str(tmp_path / "pl")))
        ),
    }
    for name, job in jobs.items():
        with pytest.raises(TokenizerMismatchError, match="vocab_size 32") as e:
            job()
        assert str(small_vocab) in str(e.value), name
    # Refused before anything was written.
    assert not any((tmp_path / d).exists() for d in ("s", "e", "o", "o2", "sc")), "outputs"
    assert not (tmp_path / "pl" / "stages").exists()


# -- non-finite losses ---------------------------------------------------------------------------


def test_scoring_stops_at_a_nan_and_writes_no_table(tmp_path, nan_model, base):
    from davir_jax.jobs.score import score

    data = _write(tmp_path / "d.jsonl", _rows(16))
    out = tmp_path / "scores"
    sc = ScoringConfig(base=str(nan_model), reference=str(base), out=str(out), shard_batches=1)
    with pytest.raises(NonFiniteLossError, match="non-finite NLL") as e:
        score(_cfg(tmp_path, nan_model, data, scoring=sc), progress=False)
    assert _named(e, "d") == {f"d:{r}" for r in BAD_ROWS}
    assert not (out / "scores.parquet").exists() and not (out / "manifest.json").exists()
    assert not list((out / "shards").rglob("*.parquet"))


def test_eval_stops_at_a_nan_and_writes_no_result(tmp_path, nan_model):
    from davir_jax.jobs.evaluate import run_eval

    data = _write(tmp_path / "d.jsonl", _rows(16))
    cfg = _cfg(tmp_path, nan_model, data, eval=EvalConfig(out=str(tmp_path / "ev")))
    with pytest.raises(NonFiniteLossError, match=str(nan_model)) as e:
        run_eval(cfg, progress=False)
    assert _named(e, "d") == {f"d:{r}" for r in BAD_ROWS}
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_sft_stops_at_the_nan_step_and_saves_no_model(tmp_path, nan_model):
    from davir_jax.jobs.sft import sft

    data = _write(tmp_path / "d.jsonl", _rows(16))
    out = tmp_path / "run"
    cfg = _cfg(
        tmp_path,
        nan_model,
        data,
        optimizer=OptimizerConfig(lr=1e-3),
        train=TrainConfig(out=str(out), epochs=2, checkpoint_every=1),
    )
    with pytest.raises(NonFiniteLossError, match="sft step 1: non-finite loss nan") as e:
        sft(cfg, progress=False)
    assert _named(e, "d") == {f"d:{r}" for r in BAD_ROWS}
    assert not (out / "model").exists()
    assert not list((out / "checkpoints").glob("[0-9]*"))  # the NaN state was never saved
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or "NaN" not in metrics.read_text()


def test_dpo_stops_at_the_nan_step_and_saves_no_model(tmp_path, nan_model, base):
    from davir_jax.jobs.dpo import dpo

    rows = _rows(10)
    pairs = _write(
        tmp_path / "p.jsonl",
        [{"prompt": r["prompt"], "chosen": r["response"], "rejected": " a task"} for r in rows],
    )
    out = tmp_path / "dpo"
    cfg = _cfg(
        tmp_path,
        nan_model,  # the policy; the reference is the clean base, so its NLLs are finite
        pairs,
        optimizer=OptimizerConfig(lr=1e-3),
        train=TrainConfig(out=str(out), epochs=1),
        dpo=DPOConfig(reference=str(base), eval_fraction=0.0),
    )
    with pytest.raises(NonFiniteLossError, match="dpo step 1: non-finite loss") as e:
        dpo(cfg, progress=False)
    # Pair 3 (the only poisoned one of 10): both of its responses.
    assert _named(e, "p") == {"p:3/chosen", "p:3/rejected"}
    assert not (out / "model").exists()

    # The NaN model as the reference: its log-probs are refused before any training.
    cfg2 = _cfg(
        tmp_path,
        base,
        pairs,
        train=TrainConfig(out=str(tmp_path / "dpo2"), epochs=1),
        dpo=DPOConfig(reference=str(nan_model), eval_fraction=0.0),
    )
    with pytest.raises(NonFiniteLossError, match="the reference") as e:
        dpo(cfg2, progress=False)
    assert _named(e, "p") == {"p:3/chosen", "p:3/rejected"}
    # Only the preflight's traces (the writable, locked output directory): no run, no model.
    assert [p.name for p in (tmp_path / "dpo2").iterdir()] == [".davir.lock"]
