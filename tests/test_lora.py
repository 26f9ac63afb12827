"""LoRA (Hu et al. 2021, arXiv 2106.09685): adapters equal their merged weights and, before
training, the base; a step trains the adapters only; a LoRA run is a model source that restores
and resumes; exports load in transformers (merged) and PEFT (adapters) with the same logits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_train import _cfg, _data, _examples, _losses, _step_batch

from davir_jax.config import load_config
from davir_jax.core.schema import ConfigError
from davir_jax.core.sharding import make_mesh, state_shardings
from davir_jax.engine.trainer import (
    _manager,
    abstract_arrays,
    make_optimizer,
    make_train_step,
    optimizer_shardings,
    restore_latest,
)
from davir_jax.jobs.sft import sft
from davir_jax.models import ArchConfig, load_model, random_model
from davir_jax.models.config import LoraConfig, ModelConfig
from davir_jax.models.loading import model_fingerprint
from davir_jax.models.lora import adapters, apply_lora, merge_lora, seed_dropout

ARCH = ArchConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2
)
IDS = (np.arange(24).reshape(2, 12) * 7) % 64
ALL = LoraConfig(rank=4, alpha=8.0, targets=(".*",))


def _perturb_b(model, seed=3):
    """Random nonzero B (trained adapters), so the adapters change the output."""
    for i, (_, _, _, ad) in enumerate(adapters(model)):
        b = ad.b.get_value()
        noise = 0.1 * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype)
        ad.b.set_value(jax.device_put(b + noise, b.sharding))


@pytest.mark.devices(8)
@pytest.mark.parametrize("scan", [True, False])
def test_zero_b_equals_base_and_merged_equals_adapters(scan):
    mesh = make_mesh(2, 2, 2)
    model = random_model(ARCH, mesh=mesh, scan_layers=scan)
    base = np.asarray(model(IDS))
    paths = apply_lora(model, ALL, 1)
    assert len(paths) == 7 * ARCH.num_layers
    np.testing.assert_array_equal(np.asarray(model(IDS)), base)  # B = 0: exactly the base
    _perturb_b(model)
    adapted = np.asarray(model(IDS))
    assert np.abs(adapted - base).max() > 0.1
    # Adapters are sharded by the rules table, like their projection.
    attn = model.layers[0].attn
    w_spec = tuple(attn.q_proj.get_value().sharding.spec)
    assert tuple(attn.q_proj_lora.a.get_value().sharding.spec) == (w_spec[0], None)
    assert tuple(attn.q_proj_lora.b.get_value().sharding.spec) == (None, *w_spec[1:])
    merged = np.asarray(merge_lora(model)(IDS))
    assert not nnx.state(model, nnx.LoRAParam)
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)


def test_targets_default_and_patterns():
    model = random_model(ARCH)
    assert apply_lora(model, LoraConfig()) == [
        f"layers.{i}.attn.{n}" for i in range(3) for n in ("q_proj", "v_proj")
    ]
    model = random_model(ARCH)
    got = apply_lora(model, LoraConfig(targets=(r"layers\.1\.mlp\..*", "o_proj")))
    assert got == ["layers.0.attn.o_proj", "layers.1.attn.o_proj"] + [
        f"layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
    ] + ["layers.2.attn.o_proj"]
    with pytest.raises(ValueError, match="model.lora.targets: 'layers.7.attn.q_proj' matches no"):
        apply_lora(random_model(ARCH), LoraConfig(targets=("q_proj", "layers.7.attn.q_proj")))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.lora.rank=0", "model.lora.rank: must be a positive integer"),
        ("--model.lora.alpha=-1", "model.lora.alpha: must be positive"),
        ("--model.lora.dropout=1", "model.lora.dropout: must be in \\[0, 1\\)"),
        ("--model.lora.quantize_base=int8", "model.lora.quantize_base: 'int8' is not one of nf4"),
        ("--model.lora.targets=[qq_proj]", "model.lora.targets: 'qq_proj' matches no projection"),
        ("--model.lora.targets=['(']", "model.lora.targets: '\\(' is not a regular expression"),
        ("--model.lora.ranks=4", "unknown key model.lora.ranks"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_from_yaml_and_overrides():
    cfg = load_config(None, ["--model.lora.rank=4", "--model.lora.targets=[q_proj, k_proj]"])
    assert cfg.model.lora == LoraConfig(rank=4, targets=("q_proj", "k_proj"))
    assert load_config(None, []).model.lora is None


def _lora_step(base, mesh, lora=ALL, dropout_seed=None, indices=(0,), scan=False):
    """One Adam step of the SFT objective with `lora`'s adapters (nonzero B, so A gets a
    gradient too) from the same start for each step index in `indices` (the step's dropout
    stream with `dropout_seed`): (base params before, after; adapters before, after; optimizer
    state; metrics) for the first index, and the adapters and metrics for each index."""
    model = load_model(base, mesh=mesh, scan_layers=scan)
    apply_lora(model, lora, 0)
    _perturb_b(model)
    graphdef, params, fixed = nnx.split(model, nnx.LoRAParam, ...)
    before = jax.tree.map(np.asarray, (params, fixed))
    tx = optax.adam(1e-2)
    psh = state_shardings(params, mesh)
    osh = optimizer_shardings(tx, params, psh, mesh)
    fsh = state_shardings(fixed, mesh)
    step = make_train_step(graphdef, tx, 8, (psh, osh), mesh, fixed=fsh, dropout_seed=dropout_seed)
    # Two micro-batches: each draws its own masks.
    micro = [[(i,) for i in range(4)], [(i,) for i in range(4, 8)]]
    batch = _step_batch(micro, 16, 1, _examples(8, seed=2))
    runs = []
    for index in indices:
        p = jax.tree.map(jax.numpy.copy, params)  # the step donates its state
        state = (p, jax.jit(tx.init, out_shardings=osh)(p))
        extra = () if dropout_seed is None else (np.int32(index),)
        (p, opt), metrics = step(state, batch, fixed, *extra)
        assert np.isfinite(float(metrics["loss"]))
        runs.append((jax.tree.map(np.asarray, p), {k: np.asarray(v) for k, v in metrics.items()}))
    first = (before, (runs[0][0], jax.tree.map(np.asarray, fixed)), opt)
    return first, runs


@pytest.mark.devices(8)
def test_a_step_trains_the_adapters_only(base):
    ((p0, f0), (p1, f1), opt), _ = _lora_step(base, make_mesh(1, 4, 2))
    for a, b in zip(jax.tree.leaves(f0), jax.tree.leaves(f1)):
        np.testing.assert_array_equal(a, b)  # the base: bitwise unchanged
    assert all(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
    n_adapter = sum(x.size for x in jax.tree.leaves(p0))
    arch = load_model(base).arch
    assert n_adapter == arch.num_layers * 4 * sum(
        i + o
        for i, o in [
            (64, 64),  # q [in 64, out 4 heads x 16]
            (64, 32),  # k
            (64, 32),  # v
            (64, 64),  # o
            (64, 96),  # gate
            (64, 96),  # up
            (96, 64),  # down
        ]
    )
    # Adam's two moments, for the adapters only (plus its step count).
    moments = [x for x in jax.tree.leaves(opt) if x.size > 1]
    assert sum(x.size for x in moments) == 2 * n_adapter


DROP = LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=(".*",))


def test_dropout_draws_its_mask_from_the_step_and_is_unbiased():
    """An adapter at rest computes `scale * (x A) B`; seeded by a step key `k`, it drops each
    input entry with probability p by the mask `bernoulli(fold_in(k, salt), 1 - p)` and scales
    the kept ones by 1 / (1 - p), so over many keys its mean is the dropout-free output."""
    model = random_model(ARCH)
    apply_lora(model, DROP, 1)
    _perturb_b(model)
    _, _, _, ad = list(adapters(model))[5]  # layers.0.mlp.up_proj: the 6th projection
    assert int(ad.salt.get_value()) == 5
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 32)))
    a, b = np.asarray(ad.a.get_value()), np.asarray(ad.b.get_value())
    plain = np.asarray(ad(x))
    np.testing.assert_allclose(plain, ad.scale * (x @ a) @ b, rtol=1e-5, atol=1e-6)
    graphdef, state = nnx.split(ad)

    def seeded(k):
        return nnx.merge(graphdef, seed_dropout(state, k))(x)

    k = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(k, 5), 0.5, x.shape))
    assert 0.35 < keep.mean() < 0.65
    want = ad.scale * ((x * keep / 0.5) @ a) @ b
    np.testing.assert_allclose(np.asarray(seeded(k)), want, rtol=1e-5, atol=1e-6)
    outs = np.asarray(jax.vmap(seeded)(jax.random.split(jax.random.key(1), 4000)))
    se = outs.std(0) / np.sqrt(len(outs))
    assert np.all(np.abs(outs.mean(0) - plain) < 5 * se + 1e-6)
    # A model at rest (evaluation, scoring, export) sees no dropout: the same logits as p = 0.
    same = random_model(ARCH)
    apply_lora(same, dataclasses.replace(DROP, dropout=0.0), 1)
    _perturb_b(same)
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(same(IDS)))


@pytest.mark.devices(8)
def test_dropout_in_the_training_step(base):
    mesh = make_mesh(1, 4, 2)
    no_drop = dataclasses.replace(DROP, dropout=0.0)
    # p = 0: no dropout stream in the model, so a step given one is today's step, bitwise.
    _, plain = _lora_step(base, mesh, no_drop)
    _, given = _lora_step(base, mesh, no_drop, dropout_seed=3)
    for a, b in zip(jax.tree.leaves(plain[0]), jax.tree.leaves(given[0])):
        np.testing.assert_array_equal(a, b)
    # p > 0: the same step index draws the same masks; another index, others; both change the
    # loss and the update.
    _, runs = _lora_step(base, mesh, DROP, dropout_seed=3, indices=(0, 0, 1))
    (p0, m0), (p0b, m0b), (p1, m1) = runs
    assert m0["loss"] == m0b["loss"]
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p0b)):
        np.testing.assert_array_equal(a, b)
    assert len({float(m0["loss"]), float(m1["loss"]), float(plain[0][1]["loss"])}) == 3
    assert abs(float(m0["grad_norm"]) - float(plain[0][1]["grad_norm"])) > 1e-4
    # Scanned layers draw the same per-layer masks as the unrolled loop.
    _, scanned = _lora_step(base, mesh, DROP, dropout_seed=3, scan=True)
    np.testing.assert_allclose(scanned[0][1]["loss"], m0["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scanned[0][0]), jax.tree.leaves(p0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _lora_cfg(tmp_path, base, out="run", **train):
    data = _data(tmp_path / "d.jsonl", 24)
    cfg = _cfg(tmp_path, base, data, out, train={"max_steps": 4, **train})
    # With dropout: a resumed run must draw the masks an uninterrupted one draws.
    lora = LoraConfig(rank=4, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))


def _restore_checkpoint(cfg, base, out):
    """The base with the adapters of the run's last checkpoint (restored as `fit` resumes)."""
    model = load_model(base)
    apply_lora(model, cfg.model.lora)
    params = nnx.state(model, nnx.LoRAParam)
    tx = make_optimizer(cfg.optimizer, 4)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    psh = jax.tree.map(lambda _: one, params)
    opt = jax.eval_shape(tx.init, params)
    target = {
        "params": abstract_arrays(params, psh),
        "opt_state": abstract_arrays(opt, jax.tree.map(lambda _: one, opt)),
    }
    step, got, meta = restore_latest(_manager(out / "checkpoints", 3), target)
    nnx.update(model, got["params"])
    return step, model, meta


def test_lora_run_is_a_model_source_and_resumes(tmp_path, base):
    cfg = _lora_cfg(tmp_path, base)
    out = sft(cfg, progress=False)
    losses = _losses(out)
    meta = json.loads((out / "model" / "davir_lora.json").read_text())
    assert meta["base"] == {"source": str(base), "fingerprint": model_fingerprint(base)}
    # Keys added to the LoRA settings later stay out of the identity at their default, so runs
    # from before them still resume.
    assert "quantize_base" not in json.loads((out / "run.json").read_text())["lora"]
    assert meta["adapted"] == [
        f"layers.{i}.{n}" for i in range(2) for n in ("attn.q_proj", "attn.v_proj", "mlp.down_proj")
    ]
    assert not (out / "model" / "params").exists()  # adapters only
    loaded = load_model(out)
    step, restored, ck_meta = _restore_checkpoint(cfg, base, out)
    assert step == 4 and ck_meta["lora_base"]["fingerprint"] == model_fingerprint(base)
    # The run directory and the checkpoint: the same adapters, the same logits.
    for (pa, *_, a), (pb, *_, b) in zip(adapters(loaded), adapters(restored)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a.b.get_value()), np.asarray(b.b.get_value()))
    np.testing.assert_array_equal(np.asarray(loaded(IDS)), np.asarray(restored(IDS)))
    assert np.abs(np.asarray(loaded(IDS)) - np.asarray(load_model(base)(IDS))).max() > 0
    fp = model_fingerprint(out)
    assert fp != model_fingerprint(base)
    # Resume: without the final model and the last checkpoint, the rerun restores step 2 and
    # redoes steps 3-4 exactly.
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "4")
    sft(cfg, progress=False)
    assert _losses(out) == losses
    assert model_fingerprint(out) == fp
    # Other adapters (a shorter run): another fingerprint.
    other = sft(_lora_cfg(tmp_path, base, "short", max_steps=2), progress=False)
    assert model_fingerprint(other) != fp


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_merged_export_loads_in_transformers(tmp_path, base):
    import transformers

    from davir_jax.cli import main

    cfg = _lora_cfg(tmp_path, base, max_steps=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=ALL))
    out = sft(cfg, progress=False)
    assert main(["export", str(out), str(tmp_path / "hf"), "--merged"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = np.asarray(load_model(out)(IDS))
    assert np.abs(ours - np.asarray(load_model(base)(IDS))).max() > 1e-3  # trained adapters
    np.testing.assert_allclose(ours, _torch_logits(hf, IDS), atol=1e-4)
    # A plain source has no adapters for --peft.
    assert main(["export", str(base), str(tmp_path / "none"), "--peft"]) == 2


@pytest.mark.parametrize(
    "targets", [(".*",), ("q_proj", r"layers\.1\.attn\.o_proj", r"layers\.0\.mlp\.down_proj")]
)
def test_peft_export_loads_in_peft(tmp_path, base, targets):
    peft = pytest.importorskip("peft", reason="peft is not installed (requirements-test.lock)")
    import transformers
    from safetensors import safe_open

    from davir_jax.cli import main
    from davir_jax.models.loading import save_lora

    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    model = load_model(base)
    apply_lora(model, lora, 5)
    _perturb_b(model)
    ours = np.asarray(model(IDS))
    assert np.abs(ours - np.asarray(load_model(base)(IDS))).max() > 1e-3
    save_lora(model, tmp_path / "lora", base, lora)
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "lora")(IDS)), ours)
    assert main(["export", str(tmp_path / "lora"), str(tmp_path / "peft"), "--peft"]) == 0
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["task_type"], conf["r"]) == ("LORA", "CAUSAL_LM", 4)
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "numpy") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert shapes[f"{q}.lora_A.weight"] == [4, 64] and shapes[f"{q}.lora_B.weight"] == [64, 4]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    np.testing.assert_allclose(ours, _torch_logits(theirs, IDS), atol=1e-4)


def test_plan_counts_the_adapters_and_their_optimizer_state_only():
    from davir_jax.jobs.plan import plan

    llama = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama2-7b.yaml"
    full = plan(load_config(llama, ["--mesh.fsdp=4"]), "sft", chip="v5p")
    cfg = load_config(llama, ["--mesh.fsdp=4", "--model.lora.rank=16"])  # q_proj, v_proj
    p = plan(cfg, "sft", chip="v5p")
    assert p["adapter_params"] == 32 * 2 * (4096 * 16 + 16 * 4096)
    mem = p["memory_bytes"]
    # bfloat16; A [embed, r] is split 4 ways over fsdp, B [r, heads, head_dim] is not (tensor=1).
    assert mem["adapters"] == 32 * 2 * (4096 * 16 * 2 // 4 + 16 * 4096 * 2)
    assert mem["params"] == full["memory_bytes"]["params"]  # the frozen base, as loaded
    assert mem["optimizer"] == 2 * mem["adapters"]
    assert mem["gradients"] == mem["adapters"] + 2 * mem["adapters"]  # bf16 + f32 accumulator
    assert p["memory_total_bytes"] < full["memory_total_bytes"]


@pytest.mark.parametrize("in_step", [False, True])
def test_dpo_trains_adapters_against_the_frozen_base(tmp_path, base, in_step):
    """The policy is base + adapters (B = 0: the base itself at step 1, so the DPO loss starts
    at log 2); the reference is the base, precomputed or resident in the step."""
    import test_preference as tp

    from davir_jax.jobs.dpo import dpo

    data = tp._pairs(tmp_path / "p.jsonl", 40)
    cfg = tp._cfg(tmp_path, base, data, dpo={"objective": "dpo", "reference_in_step": in_step})
    lora = LoraConfig(rank=4, targets=("q_proj", "v_proj", "up_proj"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))
    out = dpo(cfg, progress=False)
    m = tp._metrics(out)
    assert m[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)
    assert m[-1]["rewards/margins"] > 0
    assert json.loads((out / "model" / "davir_lora.json").read_text())["base"]["source"] == str(
        base
    )


def test_a_lora_directory_is_the_reference_of_davir_score(tmp_path, base):
    """Scoring against the adapters gives the reference NLLs of their merged weights."""
    import pyarrow.parquet as pq

    from davir_jax.config import Config, ScoringConfig
    from davir_jax.data.config import DataConfig
    from davir_jax.jobs.score import score
    from davir_jax.models import export_hf
    from davir_jax.models.loading import load_tokenizer_for, save_lora

    lora = LoraConfig(rank=4, targets=(".*",))
    model = load_model(base)
    apply_lora(model, lora, 2)
    _perturb_b(model)
    tok = load_tokenizer_for(base)
    save_lora(model, tmp_path / "lora", base, lora, tok)
    export_hf(merge_lora(model), tok, tmp_path / "merged")
    data = _data(tmp_path / "d.jsonl", 12)
    nll = {}
    for ref in ("lora", "merged"):
        cfg = Config(
            model=ModelConfig(source=str(base)),
            data=DataConfig(path=str(data), cache_dir=str(tmp_path / "c"), batch_rows=8),
            scoring=ScoringConfig(
                base=str(base), reference=str(tmp_path / ref), out=str(tmp_path / f"s-{ref}")
            ),
        )
        out = score(cfg, progress=False)
        nll[ref] = pq.read_table(out / "scores.parquet").to_pydict()
    assert nll["lora"]["example_id"] == nll["merged"]["example_id"]
    np.testing.assert_allclose(nll["lora"]["nll_base"], nll["merged"]["nll_base"], rtol=0)
    np.testing.assert_allclose(nll["lora"]["nll_ref"], nll["merged"]["nll_ref"], rtol=1e-5)
    assert not np.allclose(nll["lora"]["nll_ref"], nll["lora"]["nll_base"], rtol=1e-3)


# -- QLoRA: a 4-bit NormalFloat base (models/quant.py) ------------------------------------------


def _nf4_table_from_the_paper() -> np.ndarray:
    """QLoRA's NF4 values built as the paper (arXiv 2305.14314, Eq. 4 and Appendix E) and
    bitsandbytes' `create_normal_map` do: normal quantiles for 8 positive and 7 negative
    levels with an exact zero, scaled to [-1, 1]."""
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return (v / np.abs(v).max()).astype(np.float32)


def _np_nf4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes [..., last], dequantized weights) by brute force: each block scaled by its
    absmax, each weight's nearest table value (the first of equals)."""
    table = _nf4_table_from_the_paper()
    *lead, last = w.shape
    b = w.astype(np.float32).reshape(*lead, last // block, block)
    absmax = np.abs(b).max(-1, keepdims=True)
    normed = b / np.where(absmax > 0, absmax, 1.0)
    codes = np.abs(normed[..., None] - table).argmin(-1)
    return codes.reshape(w.shape), (table[codes] * absmax).reshape(w.shape)


def test_nf4_codes_and_values_equal_a_numpy_oracle():
    from davir_jax.models.quant import NF4, block_size, nf4_dequantize, nf4_quantize

    np.testing.assert_allclose(NF4, _nf4_table_from_the_paper(), atol=2e-7)
    rng = np.random.default_rng(0)
    for shape in [(64, 4, 16), (32, 48), (48, 256), (16, 2, 8)]:
        w = rng.standard_normal(shape).astype(np.float32) * 0.02
        w.reshape(-1)[:5] = 0.0  # zeros, and a block of zeros, stay exact
        block = block_size(shape)
        assert block == (64 if shape[-1] % 64 == 0 else np.gcd(shape[-1], 64))
        codes, absmax = nf4_quantize(jax.numpy.asarray(w), block)
        assert codes.dtype == np.uint8 and codes.shape == (*shape[:-1], shape[-1] // 2)
        want_codes, want = _np_nf4(w, block)
        got_codes = np.stack([np.asarray(codes) & 15, np.asarray(codes) >> 4], -1)
        np.testing.assert_array_equal(got_codes.reshape(shape), want_codes)
        got = np.asarray(nf4_dequantize(codes, absmax, jax.numpy.float32))
        # The oracle's table is rebuilt from scipy: within 2e-7 of bitsandbytes' constants.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        # The quantization error of a block is at most half the widest gap times its absmax.
        gap = np.diff(NF4).max() / 2
        bound = np.abs(w).reshape(*shape[:-1], -1, block).max(-1, keepdims=True) * gap
        err = np.abs(got - w).reshape(*shape[:-1], -1, block)
        assert np.all(err <= bound + 1e-7)


QLORA = LoraConfig(rank=4, alpha=8.0, targets=(".*",), quantize_base="nf4")


@pytest.mark.devices(8)
@pytest.mark.parametrize("scan", [True, False])
def test_a_4bit_base_computes_its_dequantized_weights(scan):
    """Every projection is stored in NF4 (codes sharded as the kernel), the model equals a plain
    one holding the NumPy-dequantized kernels, and merging gives that model plus the adapters."""
    from davir_jax.models.quant import NF4Kernel, block_size

    mesh = make_mesh(2, 2, 2)
    plain = random_model(ARCH, mesh=mesh, scan_layers=scan)
    kernels = {}
    for i, block in enumerate(plain.layers):
        for parent in ("attn", "mlp"):
            mod = getattr(block, parent)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
                if hasattr(mod, name):
                    kernels[(i, parent, name)] = np.asarray(getattr(mod, name).get_value())
            if parent == "mlp":
                kernels[(i, parent, "down_proj")] = np.asarray(mod.down_proj.get_value())
    specs = {k: tuple(getattr(getattr(plain.layers[k[0]], k[1]), k[2]).get_value().sharding.spec)
             for k in kernels}  # fmt: skip
    model = random_model(ARCH, mesh=mesh, scan_layers=scan)
    apply_lora(model, QLORA, 1)
    for (i, parent, name), w in kernels.items():
        q = getattr(getattr(model.layers[i], parent), name)
        assert isinstance(q, NF4Kernel)
        assert tuple(q.codes.get_value().sharding.spec) == specs[(i, parent, name)]
        mod = getattr(plain.layers[i], parent)
        deq = _np_nf4(w, block_size(w.shape))[1]
        param = getattr(mod, name)
        param.set_value(jax.device_put(deq, param.get_value().sharding))
    np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(plain(IDS)), atol=1e-5, rtol=0)
    _perturb_b(model)
    adapted = np.asarray(model(IDS))
    merged = merge_lora(model)
    assert not any(isinstance(getattr(m, "q_proj", None), NF4Kernel) for m in
                   (b.attn for b in merged.layers))  # fmt: skip
    np.testing.assert_allclose(np.asarray(merged(IDS)), adapted, atol=1e-5, rtol=0)


@pytest.mark.devices(8)
def test_a_step_on_a_4bit_base_trains_the_adapters_only(base):
    from davir_jax.models.quant import QuantCode

    ((p0, f0), (p1, f1), _), runs = _lora_step(base, make_mesh(1, 4, 2), QLORA)
    codes = [x for x in jax.tree.leaves(nnx.to_pure_dict(f0)) if x.dtype == np.uint8]
    assert codes, "no NF4 codes in the frozen state"
    for a, b in zip(jax.tree.leaves(f0), jax.tree.leaves(f1)):
        np.testing.assert_array_equal(a, b)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
    assert np.isfinite(float(runs[0][1]["loss"]))
    assert QuantCode  # the frozen codes are this variable type (split with the base)


def test_a_qlora_run_saves_adapters_on_its_4bit_base(tmp_path, base):
    """`davir sft` with `model.lora.quantize_base=nf4`: the LoRA directory records it, loads
    back (base quantized again, to the same codes) with the checkpoint's logits, and its merged
    export equals the adapter model."""
    cfg = _lora_cfg(tmp_path, base, max_steps=2)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, lora=dataclasses.replace(QLORA, dropout=0.1))
    )
    out = sft(cfg, progress=False)
    meta = json.loads((out / "model" / "davir_lora.json").read_text())
    assert meta["lora"]["quantize_base"] == "nf4"
    loaded = load_model(out)
    _, restored, _ = _restore_checkpoint(cfg, base, out)
    ours = np.asarray(loaded(IDS))
    np.testing.assert_array_equal(ours, np.asarray(restored(IDS)))
    assert np.abs(ours - np.asarray(load_model(base)(IDS))).max() > 0
    np.testing.assert_allclose(np.asarray(merge_lora(loaded)(IDS)), ours, atol=1e-5, rtol=0)


def test_plan_counts_a_4bit_base():
    from davir_jax.jobs.plan import plan

    llama = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama2-7b.yaml"
    args = ["--mesh.fsdp=4", "--model.lora.rank=16"]
    lora = plan(load_config(llama, args), "sft", chip="v5p")
    q = plan(load_config(llama, [*args, "--model.lora.quantize_base=nf4"]), "sft", chip="v5p")
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008  # q, k, v, o; gate, up, down
    proj_bf16 = 32 * per_layer * 2 // 4  # bfloat16, split 4 ways over fsdp
    proj_nf4 = 32 * per_layer * 9 // 16 // 4  # 4 bits + a float32 scale per 64 weights
    assert q["params"] == lora["params"]  # the base's parameter count, before quantization
    assert q["memory_bytes"]["params"] == lora["memory_bytes"]["params"] - proj_bf16 + proj_nf4
    # remat (the default, full) recomputes a layer's kernels in the backward pass: one layer's
    # at a time; without it every layer's stay for the backward pass.
    assert q["memory_bytes"]["dequantized_kernels"] == per_layer * 2 // 4
    no_remat = [*args, "--model.lora.quantize_base=nf4", "--model.remat=none"]
    q_none = plan(load_config(llama, no_remat), "sft", chip="v5p")
    assert q_none["memory_bytes"]["dequantized_kernels"] == 32 * per_layer * 2 // 4
    assert q["memory_total_bytes"] < lora["memory_total_bytes"]
    # Models loaded as they are count in full: a scoring job's, an in-step DPO reference.
    ref = ["--dpo.reference_in_step=true", "--model.lora.quantize_base=nf4"]
    d = plan(load_config(llama, [*args, *ref]), "dpo", chip="v5p")
    assert d["memory_bytes"]["reference"] == lora["memory_bytes"]["params"]
    both = [*args, "--model.lora.quantize_base=nf4", "--scoring.resident=both"]
    s = plan(load_config(llama, both), "score", chip="v5p")
    assert s["memory_bytes"]["params"] == 2 * lora["memory_bytes"]["params"]  # base, reference
