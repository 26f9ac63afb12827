"""Batching: plans place every example once in a fixed set of shapes; packed rows give the same
per-example NLL as each example alone; the tokenized cache is reused and rebuilt when it must be."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_tokenizers import word_tokenizer

from davir_jax.core.losses import LM_HEAD_CHUNK, example_nll
from davir_jax.data import batching
from davir_jax.data.config import DataConfig
from davir_jax.data.dataset import prepare
from davir_jax.data.skips import DataError
from davir_jax.models import ArchConfig, random_model


def _placed(plans):
    return sorted(i for p in plans for r in p.rows for i in r)


def test_bfd_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 3000)
    rows = batching.pack_bfd(lengths, 256, max_segments=8)
    assert sorted(i for r in rows for i in r) == list(range(3000))
    assert max(int(lengths[list(r)].sum()) for r in rows) <= 256
    assert max(len(r) for r in rows) <= 8
    # Best fit decreasing needs no more rows than the trivial bound plus a small margin.
    assert len(rows) <= int(np.ceil(lengths.sum() / 256) * 1.05) + 1
    assert batching.pack_bfd(lengths, 256, 8) == rows  # deterministic


def test_bfd_is_best_fit():
    # 6 then 5 then 4: 4 fits row of 6 (free 4) exactly, not row of 5 (free 5).
    assert batching.pack_bfd([5, 6, 4], 10, 4) == [(1, 2), (0,)]


def test_packed_plan_shapes_and_filler():
    lengths = np.random.default_rng(1).integers(1, 60, 101)
    plans = batching.packed_plan(lengths, rows_per_batch=4, row_len=64, max_segments=4)
    assert all(p.width == 64 and len(p.rows) == 4 for p in plans)
    assert _placed(plans) == list(range(101))
    assert all(len(r) > 0 for p in plans[:-1] for r in p.rows)  # only the last batch has filler
    a = batching.packed_plan(lengths, 4, 64, 4, shuffle=True, seed=3)
    b = batching.packed_plan(lengths, 4, 64, 4, shuffle=True, seed=3)
    c = batching.packed_plan(lengths, 4, 64, 4, shuffle=True, seed=4)
    assert a == b and a != c and _placed(a) == list(range(101))


def test_padded_plan_uses_few_widths_and_fills_only_the_last_batch():
    lengths = np.random.default_rng(2).integers(1, 500, 203)
    widths = batching.bucket_widths(512, 64)
    assert widths == (64, 128, 256, 512)
    plans = batching.padded_plan(lengths, 8, widths)
    assert {p.width for p in plans} <= set(widths)
    assert _placed(plans) == list(range(203))
    for p in plans:
        assert all(lengths[r[0]] <= p.width for r in p.rows if r)
    assert sum(1 for p in plans for r in p.rows if not r) == 8 * len(plans) - 203
    assert all(len(r) > 0 for p in plans[:-1] for r in p.rows)
    assert batching.padded_plan(lengths, 8, widths, True, 5) == batching.padded_plan(
        lengths, 8, widths, True, 5
    )
    with pytest.raises(ValueError, match="length 600"):
        batching.padded_plan([600], 8, widths)


def test_local_rows_split_evenly():
    plan = batching.BatchPlan(8, ((0,), (1,), (2,), ()))
    assert batching.local_rows(plan, 0, 2) == ((0,), (1,))
    assert batching.local_rows(plan, 1, 2) == ((2,), ())
    with pytest.raises(ValueError, match="do not split evenly"):
        batching.local_rows(plan, 0, 3)


def test_assemble_segments_positions_masks():
    data = {
        0: (np.array([5, 6, 7]), np.array([0, 1, 1])),
        1: (np.array([8, 9]), np.array([0, 1])),
    }
    b = batching.assemble([(0, 1), ()], 6, 3, lambda idx: [data[i] for i in idx])
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [0] * 6]
    assert b.segment_ids.tolist() == [[1, 1, 1, 2, 2, 0], [0] * 6]
    assert b.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0] * 6]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0], [0] * 6]
    assert b.example_index.tolist() == [[0, 1, -1], [-1, -1, -1]]
    assert b.weights.tolist() == [[1, 1, 0], [0, 0, 0]]


ARCHS = {
    "llama": ArchConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    ),
    "gemma2": ArchConfig(
        family="gemma2",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        activation="gelu_pytorch_tanh",
        tie_embeddings=True,
        layer_types=("sliding_attention", "full_attention"),
    ),
}


@pytest.mark.parametrize("family", list(ARCHS))
def test_packed_nll_equals_each_example_alone(family):
    """Per-example summed NLL from packed rows = each example scored alone (1e-5 relative)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, 12)
    data = {}
    for i, n in enumerate(lengths):
        ids = rng.integers(1, 97, n)
        mask = np.zeros(n, np.int32)
        mask[rng.integers(1, n - 1) :] = 1
        data[i] = (ids, mask)
    get = lambda idx: [data[i] for i in idx]  # noqa: E731
    model = random_model(ARCHS[family], "float32")
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, b):
        m = nnx.merge(graphdef, state)
        return example_nll(
            m,
            b["input_ids"],
            b["segment_ids"],
            b["positions"],
            b["loss_mask"],
            b["example_index"].shape[1],
            chunk=16,
        )

    plans = batching.packed_plan(lengths, 2, 64, max_segments=5)
    packed = np.zeros(len(lengths))
    counts = np.zeros(len(lengths))
    for p in plans:
        b = batching.assemble(p.rows, 64, 5, get)
        nll, cnt = f(state, {k: jnp.asarray(v) for k, v in b.arrays().items()})
        sel = b.example_index >= 0
        packed[b.example_index[sel]] = np.asarray(nll)[sel]
        counts[b.example_index[sel]] = np.asarray(cnt)[sel]
    assert any(len(r) > 1 for p in plans for r in p.rows)
    for i in range(len(lengths)):
        b = batching.assemble([(i,)], 32, 1, get)
        nll, cnt = f(state, {k: jnp.asarray(v) for k, v in b.arrays().items()})
        assert counts[i] == cnt[0, 0] == data[i][1][1:].sum()
        np.testing.assert_allclose(packed[i], float(nll[0, 0]), rtol=1e-5)


# -- prepare: tokenized cache ------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [
    {"prompt": "how are you", "response": "i am fine"},
    {"prompt": "hello", "response": "world"},
]


def test_prepare_caches_and_rebuilds_on_change(tmp_path):
    tok = word_tokenizer(True)
    path = tmp_path / "d.jsonl"
    _write(path, ROWS + [{"prompt": "x"}])
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), template="plain")
    d1 = prepare(cfg, tok, progress=False)
    assert d1.example_ids == ["d:0", "d:1"] and d1.lengths.tolist() == [8, 4]
    assert d1.log.skipped == {"missing_field": 1}
    marker = sorted(d1.directory.rglob("*"))
    d2 = prepare(cfg, tok, progress=False)
    assert d2.directory == d1.directory and sorted(d2.directory.rglob("*")) == marker
    ids, mask = d2.get([1])[0]
    assert ids.tolist() == tok("hello")["input_ids"] + tok("world", add_special_tokens=False)[
        "input_ids"
    ] + [tok.eos_token_id] and mask.tolist() == [0, 0, 1, 1]
    _write(path, ROWS)  # changed content -> another key
    d3 = prepare(cfg, tok, progress=False)
    assert d3.directory != d1.directory and d3.log.total == 0
    d4 = prepare(DataConfig(**{**cfg.__dict__, "template": "alpaca"}), tok, progress=False)
    assert d4.directory != d3.directory
    with pytest.raises(DataError, match="strict"):
        _write(path, ROWS + [{"prompt": "x"}])
        prepare(DataConfig(**{**cfg.__dict__, "strict": True}), tok, progress=False)


def test_prepare_in_parts_equals_one_part(tmp_path):
    tok = word_tokenizer(False)
    path = tmp_path / "d.jsonl"
    _write(path, [ROWS[i % 2] for i in range(7)] + [{"prompt": "p", "response": ""}])
    one = prepare(DataConfig(path=str(path), cache_dir=str(tmp_path / "a")), tok, progress=False)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "b"))
    for p in (0, 1, 2):  # three "hosts" build their parts; the last one opens the whole store
        try:
            last = prepare(cfg, tok, p, 3, progress=False, wait_timeout_s=0.05)
        except TimeoutError:
            assert p < 2
    assert last.example_ids == one.example_ids and last.lengths.tolist() == one.lengths.tolist()
    assert last.log.skipped == one.log.skipped == {"empty_response": 1}
    for i in range(len(one)):
        assert [x.tolist() for x in last.get([i])[0]] == [x.tolist() for x in one.get([i])[0]]


def test_no_recompilation_after_warm_up():
    """A fixed set of shapes: one compilation per bucket width, none on a second pass."""
    from davir_jax.engine.nll import batch_nll, nll_step

    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 120, 60)
    data = {
        i: (rng.integers(1, 97, n), (np.arange(n) >= n // 2).astype(np.int32))
        for i, n in enumerate(lengths)
    }
    get = lambda idx: [data[i] for i in idx]  # noqa: E731
    model = random_model(ARCHS["llama"], "float32")
    widths = batching.bucket_widths(128, 32)
    plans = batching.padded_plan(lengths, 4, widths)
    fn = nll_step(model.arch, model.run, 1, LM_HEAD_CHUNK)
    before = fn._cache_size()
    for _ in range(2):
        for p in plans:
            batch_nll(model, batching.assemble(p.rows, p.width, 1, get), 1)
        if _ == 0:
            warm = fn._cache_size()
    assert warm - before == len({p.width for p in plans}) and fn._cache_size() == warm


def test_prepared_data_set_has_a_manifest_with_skips(tmp_path):
    tok = word_tokenizer(True)
    path = tmp_path / "d.jsonl"
    _write(path, ROWS + [{"prompt": "x"}, {"prompt": "y", "response": ""}])
    d = prepare(DataConfig(path=str(path), cache_dir=str(tmp_path / "c")), tok, progress=False)
    m = json.loads((d.directory / "manifest.json").read_text())
    assert m["n_examples"] == 2 and m["skipped"] == {"missing_field": 1, "empty_response": 1}
    assert m["where"]["missing_field"][0].startswith(f"{path}:3")
    assert m["fields"]["template"] == "plain" and m["n_tokens"] == int(d.lengths.sum())


@pytest.mark.parametrize(
    ("adds_bos", "eos_in_loss", "overlong"),
    [(True, True, "drop"), (False, False, "drop"), (False, True, "truncate_left")],
)
def test_response_alone_is_the_same_response_after_one_start_token(
    tmp_path, adds_bos, eos_in_loss, overlong
):
    """IFD's second view: `[start] + response ids (+ EOS)`, the response's mask unchanged (T
    equal), start = BOS only where the tokenizer adds it (else EOS), whatever the prompt was."""
    from davir_jax.data.dataset import ResponseAlone, start_token

    tok = word_tokenizer(adds_bos)
    rows = [
        {"prompt": "the cat sat on the mat " * 4, "response": "a dog ran"},
        {"prompt": "hello", "response": "the mat is red and the cat"},
    ]
    path = tmp_path / "d.jsonl"
    _write(path, rows)
    cfg = DataConfig(
        path=str(path), cache_dir=str(tmp_path / "c"), eos_in_loss=eos_in_loss, max_len=20,
        overlong=overlong,
    )  # fmt: skip
    data = prepare(cfg, tok, progress=False)
    start = start_token(tok)
    assert start == (tok.bos_token_id if adds_bos else tok.eos_token_id)
    alone = ResponseAlone(data, start)
    got = alone.get(list(range(len(data))))
    for i, eid in enumerate(data.example_ids):
        row = rows[int(data.rows[i])]
        resp = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, mask = got[i]
        assert ids.tolist() == [start] + resp, eid
        assert mask.tolist() == [0] + [1] * (len(resp) - 1) + [int(eos_in_loss)]
        assert int(mask.sum()) == int(data.get([i])[0][1].sum())  # the same T
        assert alone.lengths[i] == len(ids)
