"""Content, not paths: `model_fingerprint` follows a model's weights wherever it lies (a davir-jax
checkpoint carries the digest of its parameters, other sources are hashed whole with a cached
digest); a scoring run refuses a reference retrained at the same path; and the pipeline reruns
exactly the stages downstream of a changed input, and nothing when nothing changed."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from toy_tokenizers import word_tokenizer

from davir_jax.models import loading
from davir_jax.models.loading import model_fingerprint

ROOT = Path(__file__).resolve().parents[1]


# -- model_fingerprint ---------------------------------------------------------------------------


def test_davir_checkpoint_fingerprint_is_its_parameters_not_its_path(tmp_path, base):
    from flax import nnx

    model = loading.load_model(base)
    a = loading.save_model(model, tmp_path / "a", word_tokenizer(True))
    b = loading.save_model(model, tmp_path / "elsewhere" / "b", word_tokenizer(True))
    meta = json.loads((a / loading.MODEL_META).read_text())
    assert len(meta["params_sha256"]) == 64
    assert model_fingerprint(a) == model_fingerprint(b)
    # Read from the metadata: the parameters are not read again (their files may be absent).
    fp = model_fingerprint(b)
    shutil.rmtree(b / "params")
    assert model_fingerprint(b) == fp
    # One changed value changes it.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(1e-3)
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, leaves))
    nnx.update(model, state)
    c = loading.save_model(model, tmp_path / "a", word_tokenizer(True))  # same path, new weights
    assert model_fingerprint(c) != model_fingerprint(tmp_path / "elsewhere" / "b")


def test_weight_file_digests_are_whole_and_cached(tmp_path, base, monkeypatch):
    monkeypatch.setenv("DAVIR_DIGEST_CACHE", str(tmp_path / "digests"))
    monkeypatch.setattr(loading, "DIGEST_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(loading, "_memo", {})
    copy = Path(shutil.copytree(base, tmp_path / "copy"))
    fp = model_fingerprint(base)
    assert model_fingerprint(copy) == fp  # the same bytes elsewhere
    assert list((tmp_path / "digests").glob("*.json"))
    # A new process (empty memo) takes the digests from the cache without reading the weights.
    monkeypatch.setattr(loading, "_memo", {})

    def no_read(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(loading, "file_sha256", no_read)
    assert model_fingerprint(copy) == fp
    monkeypatch.undo()
    monkeypatch.setenv("DAVIR_DIGEST_CACHE", str(tmp_path / "digests"))
    monkeypatch.setattr(loading, "DIGEST_CACHE_MIN_BYTES", 0)
    # A change in the middle of the weights (same size, same header) is seen.
    _bump_middle_tensor(copy / "model.safetensors")
    assert model_fingerprint(copy) != fp


def _bump_middle_tensor(path: Path, margin: int = 0) -> None:
    """Scale the float32 tensor nearest the middle of a safetensors file, in place: the size and
    the header stay the same; with `margin`, the first and last `margin` bytes too."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start = 8 + n
    spans = [
        (start + v["data_offsets"][0], start + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and v["dtype"] == "F32"
    ]
    lo, hi = min(
        (s for s in spans if s[0] >= margin and s[1] <= len(raw) - margin),
        key=lambda s: abs((s[0] + s[1]) / 2 - len(raw) / 2),
    )
    x = np.frombuffer(bytes(raw[lo:hi]), np.float32) * 1.5
    raw[lo:hi] = x.tobytes()
    path.write_bytes(bytes(raw))


# -- a standalone scoring run ----------------------------------------------------------------------


def test_score_refuses_a_reference_retrained_at_the_same_path(tmp_path, base):
    """The reference's weights change in the middle of a > 2 MiB file (the first and last MiB,
    the size and the names unchanged): rescoring into the same folder is another run."""
    from hf_models import make_hf_model

    from davir_jax.config import Config, ScoringConfig
    from davir_jax.core.runs import MixedRunError
    from davir_jax.data.config import DataConfig
    from davir_jax.jobs.score import score

    ref = tmp_path / "ref"
    make_hf_model("llama", ref, seed=1, hidden_size=128, intermediate_size=1024)
    word_tokenizer(True).save_pretrained(ref)
    weights = ref / "model.safetensors"
    assert weights.stat().st_size > 3 << 20
    rows = [{"prompt": "hello world how are", "response": " you i am fine"}] * 3
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(
        data=DataConfig(path=str(data), cache_dir=str(tmp_path / "cache"), max_len=32),
        scoring=ScoringConfig(base=str(base), reference=str(ref), out=str(tmp_path / "s")),
    )
    out = score(cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    # One fingerprint everywhere: the scoring manifest holds model_fingerprint's.
    assert manifest["fingerprints"]["reference"] == model_fingerprint(ref)
    assert manifest["fingerprints"]["base"] == model_fingerprint(base)
    before = weights.read_bytes()
    _bump_middle_tensor(weights, margin=1 << 20)
    after = weights.read_bytes()
    mib = 1 << 20
    assert before[:mib] == after[:mib] and before[-mib:] == after[-mib:] and before != after
    with pytest.raises(MixedRunError, match="different models"):
        score(cfg, progress=False)


# -- the pipeline --------------------------------------------------------------------------------


def _stage_lines(err: str) -> tuple[set[str], set[str]]:
    """(stages run, stages skipped) from the pipeline's stderr."""
    ran, skipped = set(), set()
    for line in err.splitlines():
        if not line.startswith("[pipeline] ") or line.startswith("[pipeline] report"):
            continue
        text = line[len("[pipeline] ") :]
        if text.endswith(": done before, skipped"):
            skipped.add(text[: -len(": done before, skipped")])
        elif text.endswith(" ..."):
            ran.add(text[: -len(" ...")])
    return ran, skipped


STAGES = {
    "reference",
    "scores",
    "select/davir-fraction0.5-s0",
    "select/random-fraction0.5-s0",
    "sft/davir-fraction0.5-s0",
    "sft/random-fraction0.5-s0",
    "eval/base",
    "eval/full",
    "eval/davir-fraction0.5-s0",
    "eval/random-fraction0.5-s0",
}


@pytest.mark.slow
def test_pipeline_reruns_exactly_what_a_changed_input_feeds(tmp_path, base, capsys):
    from davir_jax.cli import main
    from davir_jax.config import load_config
    from davir_jax.demo import make_splits
    from davir_jax.jobs.sft import sft

    paths = make_splits(tmp_path / "data", n_pool=40, n_val=8, n_test=8, seed=0)
    run = tmp_path / "run"
    config = str(ROOT / "configs" / "demo.yaml")
    overrides = [
        f"--model.source={base}",
        f"--data.path={paths['pool']}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.batch_rows=8",
        "--train.epochs=2",
        "--pipeline.methods=[davir, random]",
        "--pipeline.budgets=[fraction=0.5]",
        "--pipeline.seeds=1",
        "--pipeline.generate=2",
        "--eval.max_new_tokens=2",
    ]
    args = [
        "pipeline",
        "--config",
        config,
        "--out",
        str(run),
        "--test",
        str(paths["test"]),
        "-q",
        *overrides,
    ]

    def pipeline(*extra: str) -> tuple[set[str], set[str]]:
        capsys.readouterr()
        assert main([*args, *extra]) == 0
        err = capsys.readouterr().err
        assert "[pipeline] report:" in err  # the report is written again every time
        return _stage_lines(err)

    def nll(column: str) -> np.ndarray:
        return pq.read_table(run / "scores" / "scores.parquet").column(column).to_numpy()

    assert pipeline() == (STAGES, set())
    ref1, base1 = nll("nll_ref"), nll("nll_base")
    assert pipeline() == (set(), STAGES)  # nothing changed: nothing reruns

    # Another learning rate (the command): the reference and everything after it
    # rerun; the base's evaluation does not depend on it.
    changed = ("--optimizer.lr=2e-3", "--train.overwrite=true")
    assert pipeline(*changed) == (STAGES - {"eval/base"}, {"eval/base"})
    ref2 = nll("nll_ref")
    assert not np.allclose(ref2, ref1)
    np.testing.assert_array_equal(nll("nll_base"), base1)
    assert pipeline(*changed) == (set(), STAGES)

    # The reference retrained in place by hand (same path, other weights): its record still
    # matches, but what consumes it (scores, selections, the reference's evaluation) reruns.
    cfg = load_config(
        config,
        [*overrides, f"--train.out={run / 'reference'}", "--optimizer.lr=5e-3"]
        + ["--train.overwrite=true"],
    )
    sft(cfg, progress=False)
    ran, skipped = pipeline(*changed)
    assert "reference" in skipped and "eval/base" in skipped
    assert {
        "scores",
        "select/davir-fraction0.5-s0",
        "select/random-fraction0.5-s0",
        "eval/full",
    } <= ran
    assert not np.allclose(nll("nll_ref"), ref2)
    # The random selection does not depend on the scores: same rows, so its SFT and evaluation
    # are kept.
    assert {"sft/random-fraction0.5-s0", "eval/random-fraction0.5-s0"} <= skipped
    assert ran | skipped == STAGES
    stage = json.loads((run / "stages" / "scores.json").read_text())
    assert str(run) not in json.dumps(stage["inputs"])  # contents, not paths
