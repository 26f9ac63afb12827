"""Every family against transformers' PyTorch model: import, logits, export, packing."""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import FAMILIES, hf_logits, make_hf_model

from davir_jax.models import export_hf, load_model, save_model

TOL = 1e-4  # max abs logit difference, float32 (issue 2)
LENGTHS = (11, 7, 3)  # a batch of sequences of different lengths, right-padded


def _batch(vocab: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    width = max(LENGTHS)
    ids = rng.integers(0, vocab, (len(LENGTHS), width)).astype(np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, d)
    return request.param, d, hf


def _max_diff_real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


def test_logits_match_pytorch(family_model):
    family, d, hf = family_model
    model = load_model(d)
    assert model.arch.family == family
    ids, mask = _batch(model.arch.vocab_size)
    ours = np.asarray(model(ids, segment_ids=mask))
    ref = hf_logits(hf, ids, mask)
    assert _max_diff_real(ours, ref, mask) < TOL


def test_export_roundtrip_gives_pytorch_same_logits(family_model, tmp_path):
    import transformers as tf

    family, d, hf = family_model
    model = load_model(d)
    out = export_hf(model, None, tmp_path / "exported")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    ids, mask = _batch(model.arch.vocab_size, seed=2)
    assert _max_diff_real(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask), mask) < TOL
    # ... and our own loader reads the export back exactly.
    again = load_model(out)
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def _pack(seqs: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One packed row `(ids, segment_ids, positions)` `[1, width]` of `seqs`, then padding."""
    ids, seg, pos = (np.zeros((1, width), np.int32) for _ in range(3))
    start = 0
    for k, s in enumerate(seqs, start=1):
        ids[0, start : start + len(s)] = s
        seg[0, start : start + len(s)] = k
        pos[0, start : start + len(s)] = np.arange(len(s))
        start += len(s)
    return ids, seg, pos


def test_packed_rows_equal_separate_rows(family_model):
    _, d, _ = family_model
    model = load_model(d)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, model.arch.vocab_size, n).astype(np.int32) for n in (6, 9, 4)]
    packed = np.asarray(model(*_pack(seqs, 24)))[0]
    start = 0
    for s in seqs:
        alone = np.asarray(model(s[None]))[0]
        np.testing.assert_allclose(packed[start : start + len(s)], alone, rtol=0, atol=1e-5)
        start += len(s)


def test_blocked_attention_on_packed_rows_matches_pytorch(family_model):
    """Packed rows through the blocked attention (8-token blocks, key blocks of other examples
    skipped; sliding windows and soft-capping where the family has them) give, per example, the
    logits transformers computes for that example alone."""
    _, d, hf = family_model
    model = load_model(d, attn_block=8)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, model.arch.vocab_size, n).astype(np.int32) for n in (3, 10, 5, 13)]
    packed = np.asarray(model(*_pack(seqs, 32)))[0]
    start = 0
    for s in seqs:
        ref = hf_logits(hf, s[None], np.ones((1, len(s)), np.int32))[0]
        assert np.abs(packed[start : start + len(s)] - ref).max() < TOL
        start += len(s)


def test_remat_and_project_checkpoint(family_model, tmp_path):
    _, d, _ = family_model
    model = load_model(d)
    ids, mask = _batch(model.arch.vocab_size)
    base = np.asarray(model(ids, segment_ids=mask))
    remat = load_model(d, remat=True)
    np.testing.assert_allclose(np.asarray(remat(ids, segment_ids=mask)), base, atol=1e-6)
    ck = save_model(model, tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(load_model(ck)(ids, segment_ids=mask)), base)


def test_bfloat16_compute_is_close(family_model):
    _, d, hf = family_model
    model = load_model(d, "float32", compute_dtype="bfloat16")
    ids, mask = _batch(model.arch.vocab_size)
    ours = np.asarray(model(ids, segment_ids=mask))
    ref = hf_logits(hf, ids, mask)
    # bf16 has 8 mantissa bits; a loose sanity bound, not a parity claim.
    assert _max_diff_real(ours, ref, mask) < 0.1
    m16 = load_model(d, "bfloat16")
    assert str(next(iter(m16.embed.get_value().dtype.name for _ in [0]))) == "bfloat16"


def test_sharded_safetensors_with_index(family_model, tmp_path):
    """HF's multi-file layout: tensors spread over shards named by model.safetensors.index.json."""
    import json
    import shutil

    from davir_jax.models.safetensors_io import SafetensorsFile, save_file

    _, d, hf = family_model
    src = SafetensorsFile(d / "model.safetensors")
    names = src.keys()
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(d / "config.json", out / "config.json")
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: np.array(src.get(n)) for n in part}, out / fname)
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids, mask = _batch(hf.config.vocab_size)
    ours = np.asarray(load_model(out)(ids, segment_ids=mask))
    assert _max_diff_real(ours, hf_logits(hf, ids, mask), mask) < TOL


VARIANTS = {
    "llama-bias-linear-rope-tied": (
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "qwen2-sliding-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "gemma-silu-attention-bias": ("gemma", dict(hidden_act="silu", attention_bias=True)),
    "gemma2-untied": ("gemma2", dict(tie_word_embeddings=False)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_pytorch(variant, tmp_path):
    """Options off the families' defaults: each must change our math exactly as it does HF's."""
    family, over = VARIANTS[variant]
    hf = make_hf_model(family, tmp_path, **over)
    model = load_model(tmp_path)
    ids, mask = _batch(model.arch.vocab_size)
    ours = np.asarray(model(ids, segment_ids=mask))
    assert _max_diff_real(ours, hf_logits(hf, ids, mask), mask) < TOL
