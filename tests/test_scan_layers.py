"""`model.scan_layers`: the layer stack as one `lax.scan`, equal to the unrolled loop.

Oracle: the unrolled Python loop of the same model (logits and gradients, float32), on every
family of tests/hf_models.py, packed rows, remat, 8 fake devices, and checkpoints saved by one
form and restored by the other. The compiled program's size is bounded in depth (HLO text).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import FAMILIES, make_hf_model

from davir_jax.config import load_config
from davir_jax.core.schema import ConfigError
from davir_jax.models import ArchConfig, load_model, random_model, save_model
from davir_jax.models.config import ModelConfig
from davir_jax.models.decoder import RunConfig, layer_period

RTOL, ATOL = 1e-5, 1e-6
# Gradients: relative to each leaf's largest entry. Dense instead of blocked attention, the same
# mathematics, moves Gemma2's gradients by up to 9.4e-7 of it; its scanned groups of two layers
# fuse differently from the loop and move them by up to 1.2e-6 (the uniform families' scans
# matched the loop exactly when measured).
GRAD_ATOL = 1e-5
# Gemma2 (period 2): two scanned groups and one unrolled layer; the others: three scanned.
LAYERS = {"gemma2": 5}


def _packed(vocab: int, b: int = 2, t: int = 32, seed: int = 0):
    """Rows of several examples each (segment ids 1, 2, ..., 0 = trailing padding)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r, lengths in enumerate([(11, 9, 8), (20, 7)][:b]):
        start = 0
        for s, n in enumerate(lengths, 1):
            seg[r, start : start + n] = s
            pos[r, start : start + n] = np.arange(n)
            start += n
    return ids, seg, pos


def _value_and_grad(model, ids, seg, pos):
    """Logits and the gradient of a weighted sum of them w.r.t. every parameter."""
    graphdef, params = nnx.split(model)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(*ids.shape, model.arch.vocab_size)))
    w = w.astype(jnp.float32) * (jnp.asarray(seg) > 0)[..., None]

    def f(params):
        logits = nnx.merge(graphdef, params)(ids, seg, pos)
        return jnp.sum(logits * w), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return logits, nnx.to_pure_dict(grads)


def _assert_tree_close(a, b):
    """Every gradient leaf of `a` allclose to `b`: RTOL, and an absolute tolerance of GRAD_ATOL
    times the leaf's largest entry. Entries that are sums of large terms of both signs (Gemma2's
    tied embedding gradient reaches 1e4 with entries near 0) keep the rounding of those terms,
    which any reassociation of float32 sums changes (another fusion, devices)."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)  # gathered: a sharded leaf against a local one
        ok = np.allclose(x, y, rtol=RTOL, atol=GRAD_ATOL * np.abs(y).max())
        assert ok, (jax.tree_util.keystr(path), float(np.abs(x - y).max()))


def _scan_lengths(model, ids, seg, pos) -> list[int]:
    """The lengths of the `scan`s in the model's forward jaxpr."""
    graphdef, params = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids, seg, pos))(params)
    return [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]


def _arch(n: int, **kw) -> ArchConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    return ArchConfig(**{**base, "num_layers": n, **kw})


def _alternating(n: int) -> tuple[str, ...]:
    """Gemma2's layer pattern: sliding, global, sliding, ..."""
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))


def test_layer_period_follows_the_static_pattern():
    def period(arch: ArchConfig) -> int:
        return layer_period([nnx.split(b) for b in random_model(arch).layers])

    assert period(_arch(4)) == 1
    assert period(_arch(4, sliding_window=4)) == 1  # Mistral: every layer the same window
    alternating = _arch(5, family="gemma2", sliding_window=4, layer_types=_alternating(5))
    assert period(alternating) == 2
    # Qwen2's max_window_layers: full layers, then sliding ones. [F F][F F] repeat, S is left.
    fffs = ("full_attention",) * 4 + ("sliding_attention",)
    assert period(_arch(5, sliding_window=4, layer_types=fffs)) == 2
    # F F F S S S: no two groups repeat; nothing is scanned.
    mixed = ("full_attention",) * 3 + ("sliding_attention",) * 3
    arch = _arch(6, sliding_window=4, layer_types=mixed)
    assert period(arch) == 6
    ids, seg, pos = _packed(64)
    assert _scan_lengths(random_model(arch, scan_layers=True), ids, seg, pos) == []


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, d, num_hidden_layers=LAYERS.get(request.param, 3))
    return request.param, d


# attn_block=16 of 32 tokens: blocked attention (its lax.switch) inside the scanned body.
BLOCK = 16


@pytest.fixture(scope="module")
def loop_result(family_dir):
    """The unrolled loop's logits and gradients on packed rows: the oracle."""
    _, d = family_dir
    loop = load_model(d, attn_block=BLOCK)
    ids, seg, pos = _packed(loop.arch.vocab_size)
    assert _scan_lengths(loop, ids, seg, pos) == []
    return _value_and_grad(loop, ids, seg, pos)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_equals_the_unrolled_loop_in_logits_and_gradients(family_dir, loop_result, remat):
    family, d = family_dir
    scan = load_model(d, attn_block=BLOCK, scan_layers=True, remat=remat)
    ids, seg, pos = _packed(scan.arch.vocab_size)
    layers, period = scan.arch.num_layers, 2 if family == "gemma2" else 1
    assert _scan_lengths(scan, ids, seg, pos) == [layers // period]
    ref_logits, ref_grads = loop_result
    logits, grads = _value_and_grad(scan, ids, seg, pos)
    assert jnp.allclose(logits, ref_logits, rtol=RTOL, atol=ATOL)
    _assert_tree_close(grads, ref_grads)
    # Every layer, the unrolled remainder included, gets a gradient of its own.
    assert set(grads["layers"]) == set(range(layers))


def test_remat_checkpoints_the_scanned_body():
    arch = _arch(4)
    ids, seg, pos = _packed(64)
    model = random_model(arch, scan_layers=True, remat=True)
    graphdef, params = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids, seg, pos))(params)
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    body = scan.params["jaxpr"].jaxpr
    names = [e.primitive.name for e in body.eqns if e.primitive.name != "pjit"]
    assert names in (["checkpoint"], ["remat2"])  # jax.checkpoint's primitive, by JAX version


def test_generation_keeps_the_loop_and_its_results(family_dir):
    from davir_jax.models.generation import greedy_generate

    _, d = family_dir
    prompts = [[3, 5, 7, 9], [11, 2]]
    want = greedy_generate(load_model(d), prompts, 6, bucket=8)
    assert greedy_generate(load_model(d, scan_layers=True), prompts, 6, bucket=8) == want


@pytest.mark.parametrize("saved_with_scan", [True, False])
def test_checkpoints_interchange_between_scan_and_loop(tmp_path, saved_with_scan):
    """Train one step with one form, save, restore with the other: the same logits."""
    arch = _arch(
        5, family="gemma2", sliding_window=4, attn_logit_softcap=5.0, layer_types=_alternating(5)
    )
    model = random_model(arch, scan_layers=saved_with_scan, seed=3)
    ids, seg, pos = _packed(64)
    _, grads = _value_and_grad(model, ids, seg, pos)
    state = nnx.state(model, nnx.Param)
    updated = jax.tree.map(lambda p, g: p - 1e-3 * g, nnx.to_pure_dict(state), grads)
    nnx.replace_by_pure_dict(state, updated)
    nnx.update(model, state)
    want = model(ids, seg, pos)
    save_model(model, tmp_path / "m")
    restored = load_model(tmp_path / "m", scan_layers=not saved_with_scan)
    assert restored.run.scan_layers is not saved_with_scan
    got = restored(ids, seg, pos)
    assert jnp.allclose(got, want, rtol=RTOL, atol=ATOL)


def test_sft_with_scan_trains_as_the_loop_and_its_model_loads_unscanned(tmp_path, base):
    from davir_jax.config import Config
    from davir_jax.data.config import DataConfig
    from davir_jax.engine.config import OptimizerConfig, TrainConfig
    from davir_jax.jobs.sft import sft

    rows = [
        {"prompt": "the cat sat", "response": " on the mat"},
        {"prompt": "a dog ran", "response": " to the park and back"},
        {"prompt": "we eat", "response": " bread"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(name: str, scan: bool):
        cfg = Config(
            model=ModelConfig(source=str(base), scan_layers=scan),
            data=DataConfig(
                path=str(data), cache_dir=str(tmp_path / "cache"), batch_rows=8, max_len=32
            ),
            optimizer=OptimizerConfig(lr=3e-3, warmup_steps=1),
            train=TrainConfig(out=str(tmp_path / name), epochs=3, checkpoint_every=1000),
        )
        out = sft(cfg, progress=False)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return out, [json.loads(x)["loss"] for x in lines]

    out_scan, loss_scan = run("scan", True)
    _, loss_loop = run("loop", False)
    assert len(loss_scan) == len(loss_loop) >= 3
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=RTOL)
    ids = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
    loop = load_model(out_scan, scan_layers=False)
    assert loop.run.scan_layers is False
    assert jnp.allclose(
        loop(ids), load_model(out_scan, scan_layers=True)(ids), rtol=RTOL, atol=ATOL
    )


@pytest.mark.devices(8)
def test_scan_on_8_devices_equals_one_device(family_dir):
    """fsdp=4 x tensor=2, every layer's activations constrained inside the scanned body.

    Float32 sums split over devices add in another order, so logits are compared to 1e-5 (as in
    test_sharding.py); gradients as everywhere here. Against the one-device loop and against
    the same mesh's loop.
    """
    from davir_jax.core.sharding import batch_sharding, make_mesh

    family, d = family_dir
    if family not in ("llama", "gemma2"):
        pytest.skip("one uniform and one alternating stack suffice for the mesh")
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    rows = 8  # over fsdp=4
    packed = [np.tile(a, (rows // 2, 1)) for a in _packed(load_model(d).arch.vocab_size)]
    single = _value_and_grad(load_model(d, attn_block=BLOCK), *packed)
    ids, seg, pos = (jax.device_put(a, batch_sharding(mesh)) for a in packed)
    loop = _value_and_grad(load_model(d, mesh=mesh, attn_block=BLOCK), ids, seg, pos)
    scan_model = load_model(d, mesh=mesh, attn_block=BLOCK, scan_layers=True)
    assert _scan_lengths(scan_model, ids, seg, pos)
    logits, grads = _value_and_grad(scan_model, ids, seg, pos)
    assert len(jax.tree.leaves(grads)[0].sharding.device_set) == 8
    for ref_logits, ref_grads in (single, loop):
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0, atol=1e-5)
        _assert_tree_close(grads, ref_grads)


@pytest.mark.parametrize("remat", [False, True])
def test_compiled_program_is_bounded_in_depth(remat):
    """The forward + backward program of an 8-layer model is about the 2-layer one with scan
    (one layer body), and grows with depth without."""

    def hlo_chars(layers: int, scan: bool) -> int:
        model = random_model(_arch(layers), remat=remat, scan_layers=scan)
        graphdef, params = nnx.split(model)
        ids, seg, pos = _packed(64)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(ids, seg, pos) ** 2)

        return len(jax.jit(jax.value_and_grad(loss)).lower(params).as_text())

    scan_ratio = hlo_chars(8, True) / hlo_chars(2, True)
    loop_ratio = hlo_chars(8, False) / hlo_chars(2, False)
    assert scan_ratio <= 1.3, scan_ratio
    assert loop_ratio >= 2.5, loop_ratio


def test_scan_layers_config_key(tmp_path):
    assert ModelConfig().scan_layers is True  # the default: compile time bounded in depth
    assert ModelConfig().scan_layers == RunConfig().scan_layers
    cfg = load_config(None, ["--model.scan_layers=false"])
    assert cfg.model.scan_layers is False and cfg.model.run_options()["scan_layers"] is False
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  scan_layers: sometimes\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*model\.scan_layers"):
        load_config(p)
