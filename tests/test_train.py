"""SFT: the loss falls and a tiny set is memorised; accumulation and packing leave the loss and
gradients unchanged; the sharded step equals one device; SIGKILL + restart equals an
uninterrupted run; checkpoints restore onto another mesh, and a corrupt one is skipped."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import run_cli
from flax import nnx
from toy_tokenizers import WORDS, word_tokenizer

from davir_jax.config import Config
from davir_jax.core.sharding import make_mesh, state_shardings
from davir_jax.data import batching
from davir_jax.data.config import DataConfig
from davir_jax.engine.config import OptimizerConfig, TrainConfig
from davir_jax.engine.trainer import (
    _manager,
    abstract_arrays,
    make_optimizer,
    make_train_step,
    optimizer_shardings,
    restore_latest,
)
from davir_jax.jobs.sft import sft
from davir_jax.models import load_model
from davir_jax.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
PLAIN = [w for w in WORDS if w.isalpha()]


def _data(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = [
        {
            "prompt": " ".join(rng.choice(PLAIN, rng.integers(2, 6))),
            "response": " " + " ".join(rng.choice(PLAIN, rng.integers(2, 8))),
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, base, data, out="run", **kw) -> Config:
    return Config(
        model=ModelConfig(source=str(base)),
        data=DataConfig(
            path=str(data),
            cache_dir=str(tmp_path / "cache"),
            batch_rows=8,
            max_len=32,
            **kw.pop("data", {}),
        ),
        optimizer=OptimizerConfig(**{"lr": 3e-3, "warmup_steps": 2, **kw.pop("optimizer", {})}),
        train=TrainConfig(
            out=str(tmp_path / out), **{"checkpoint_every": 2, **kw.pop("train", {})}
        ),
        **kw,
    )


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_a_tiny_set_is_memorised(tmp_path, base):
    data = _data(tmp_path / "d.jsonl", 8)
    cfg = _cfg(
        tmp_path,
        base,
        data,
        train={"epochs": 150, "checkpoint_every": 1000},
        optimizer={"lr": 1e-2, "schedule": "constant"},
    )
    out = sft(cfg, progress=False)
    losses = _losses(out)
    assert len(losses) == 150  # 8 examples in one packed row per step
    assert losses[5] < losses[0] and losses[-1] < 0.05, losses[-5:]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # DIR is a model source, and the model it names has memorised the set.
    from davir_jax.engine.nll import sequence_losses

    model = load_model(out)
    assert model.arch == load_model(base).arch
    assert np.isfinite(sequence_losses(model, [[1, 5, 6, 7]])[0])
    # TensorBoard event file holds the same scalars (read back with the proto definitions).
    from tensorboardX.proto import event_pb2

    (events,) = list((out / "tb").glob("events.out.tfevents.*"))
    raw, tb = events.read_bytes(), []
    while raw:
        (n,) = struct.unpack("<Q", raw[:8])
        ev = event_pb2.Event.FromString(raw[12 : 12 + n])
        raw = raw[12 + n + 4 :]
        tb += [(ev.step, v.simple_value) for v in ev.summary.value if v.tag == "train/loss"]
    assert [s for s, _ in tb] == list(range(1, 151))
    np.testing.assert_allclose([v for _, v in tb], losses, rtol=1e-6)


def _examples(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        k = int(rng.integers(4, 12))
        ids = rng.integers(5, 100, k)
        m = np.zeros(k, np.int32)
        m[int(rng.integers(1, k - 1)) :] = 1
        out[i] = (ids, m)
    return out


def _step_batch(rows_list, width, segs, data):
    bs = [
        batching.assemble(rows, width, segs, lambda idx: [data[i] for i in idx])
        for rows in rows_list
    ]
    keys = ("input_ids", "segment_ids", "positions", "loss_mask", "weights")
    return {k: jax.numpy.asarray(np.stack([getattr(b, k) for b in bs])) for k in keys}


def _one_step(base, batch, mesh=None):
    """(loss, grad norm, gradient) of one step: plain SGD with lr 1 makes the parameter change
    the (negated) gradient itself, so gradients are compared directly (Adam's first step,
    ~lr*sign(g), would magnify rounding in near-zero gradients)."""
    model = load_model(base, mesh=mesh)
    graphdef, params = nnx.split(model)
    before = jax.tree.map(np.asarray, params)
    tx = optax.sgd(1.0)
    if mesh is None:
        state = (params, tx.init(params))
        fn = make_train_step(graphdef, tx, 8)
    else:
        psh = state_shardings(params, mesh)
        osh = optimizer_shardings(tx, params, psh, mesh)
        state = (params, jax.jit(tx.init, out_shardings=osh)(params))
        fn = make_train_step(graphdef, tx, 8, (psh, osh), mesh)
    (params, _), m = fn(state, batch)
    grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, params)
    # before - after resolves the gradient only to the float32 spacing of the parameters.
    resolution = jax.tree.map(lambda b: 4 * np.finfo(np.float32).eps * np.abs(b).max(), before)
    return float(m["loss"]), float(m["grad_norm"]), (grads, resolution)


def _close(a, b, rtol):
    (ga, res), (gb, _) = a, b
    for x, y, r in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), jax.tree.leaves(res)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=r)


def test_accumulation_and_packing_leave_loss_and_update_unchanged(base):
    data = _examples(8)
    rows = [(i,) for i in range(8)]
    one = _one_step(base, _step_batch([rows], 16, 1, data))
    accum = _one_step(base, _step_batch([rows[:4], rows[4:]], 16, 1, data))
    packed_rows = batching.pack_bfd([len(data[i][0]) for i in range(8)], 32, 4)
    packed_rows += [()] * (8 - len(packed_rows))
    packed = _one_step(base, _step_batch([packed_rows], 32, 4, data))
    for other in (accum, packed):
        np.testing.assert_allclose(other[0], one[0], rtol=1e-6)
        np.testing.assert_allclose(other[1], one[1], rtol=1e-5)
        _close(other[2], one[2], 1e-5)
    # Unequal token counts across micro-batches: a mean of micro-batch means would differ.
    counts = [int(sum(data[i][1][1:].sum() for i in r)) for r in (range(4), range(4, 8))]
    assert counts[0] != counts[1]


@pytest.mark.devices(8)
def test_sharded_step_equals_one_device(base):
    data = _examples(8, seed=2)
    rows = [(i,) for i in range(8)]
    batch = _step_batch([rows], 16, 1, data)
    one = _one_step(base, batch, make_mesh(1, 1, 1, jax.devices()[:1]))
    mesh = make_mesh(2, 2, 2)
    sharded_batch = {
        k: jax.device_put(
            v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        )
        for k, v in batch.items()
    }
    eight = _one_step(base, sharded_batch, mesh)
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
    _close(eight[2], one[2], 1e-4)


@pytest.mark.devices(8)
def test_checkpoint_restores_onto_another_mesh_and_corrupt_one_is_skipped(tmp_path, base, capsys):
    data = _data(tmp_path / "d.jsonl", 40)
    cfg = _cfg(tmp_path, base, data, train={"max_steps": 4})
    out = sft(cfg, False, make_mesh(1, 8, 1))
    first = _losses(out)
    # Restore the final checkpoint onto another mesh: same values, new layout.
    mesh = make_mesh(1, 2, 4)
    model = load_model(base, mesh=mesh)
    _, params = nnx.split(model)
    tx = make_optimizer(cfg.optimizer, 4)
    psh = state_shardings(params, mesh)
    osh = optimizer_shardings(tx, params, psh, mesh)
    opt = jax.eval_shape(tx.init, params)
    target = {"params": abstract_arrays(params, psh), "opt_state": abstract_arrays(opt, osh)}
    step, got, meta = restore_latest(_manager(out / "checkpoints", 3), target)
    assert step == 4 and meta["step"] == 4
    final = load_model(out)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(nnx.state(final))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = got["params"]["layers"][0]["attn"]["q_proj"]
    assert q.get_value().sharding.mesh.shape == mesh.shape
    # Corrupt the last checkpoint: the rerun reports it, restores step 2 and redoes 3-4.
    for f in (out / "checkpoints" / "4").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "state" in f.parts:
            f.write_bytes(b"\0" * 8)
    again = sft(cfg, False, make_mesh(1, 8, 1))
    assert "checkpoint step 4" in capsys.readouterr().err
    assert _losses(again) == first


def _cli(args):
    return run_cli("sft", args)


def test_killed_and_restarted_equals_uninterrupted(tmp_path, base):
    data = _data(tmp_path / "d.jsonl", 64, seed=3)
    common = [
        "--model",
        str(base),
        "--data",
        str(data),
        f"--data.cache_dir={tmp_path / 'c'}",
        "--data.batch_rows=2",
        "--data.max_len=32",
        "--train.epochs=6",
        "--train.checkpoint_every=3",
        "--train.grad_accum=2",
        "--optimizer.lr=1e-3",
        "-q",
    ]
    full = _cli(common + ["--out", str(tmp_path / "full")])
    assert full.wait(600) == 0, full.stdout.read().decode()
    out = tmp_path / "killed"
    proc = _cli(common + ["--out", str(out)])
    deadline = time.time() + 300
    ck = out / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ck.is_dir() and any(p.name.isdigit() and int(p.name) >= 6 for p in ck.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()
    again = _cli(common + ["--out", str(out)])
    assert again.wait(600) == 0, again.stdout.read().decode()
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, len(a) + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bitwise on CPU
    assert [r["examples_seen"] for r in b] == [r["examples_seen"] for r in a]
    assert a[-1]["examples_seen"] == 6 * 64  # every example once per epoch


def test_other_run_is_refused(tmp_path, base):
    from davir_jax.core.runs import MixedRunError

    data = _data(tmp_path / "d.jsonl", 8)
    cfg = _cfg(tmp_path, base, data, train={"max_steps": 1})
    sft(cfg, False)
    with pytest.raises(MixedRunError, match="optimizer"):
        sft(dataclasses.replace(cfg, optimizer=OptimizerConfig(lr=1e-4)), False)


def test_decay_mask_and_schedule():
    from davir_jax.engine.trainer import decay_mask, lr_schedule
    from davir_jax.models import ArchConfig, random_model

    arch = ArchConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        qkv_bias=True,
    )
    _, params = nnx.split(random_model(arch))
    mask = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    }
    assert not any(v for k, v in mask.items() if "norm" in k or "bias" in k)
    assert all(v for k, v in mask.items() if "proj" in k and "bias" not in k)
    s = lr_schedule(OptimizerConfig(lr=1.0, warmup_ratio=0.1), 100)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
    assert float(s(55)) == pytest.approx(0.5, abs=0.02) and float(s(99)) < 0.01
    tx = make_optimizer(OptimizerConfig(), 10)
    assert isinstance(tx, optax.GradientTransformation)


def test_trained_run_exports_to_hugging_face(tmp_path, base):
    import torch
    import transformers

    from davir_jax.cli import main

    data = _data(tmp_path / "d.jsonl", 8)
    out = sft(_cfg(tmp_path, base, data, train={"max_steps": 2}), progress=False)
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = np.array([[1, 5, 6, 7, 8]])
    ours = np.asarray(load_model(out)(ids))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("hello world")["input_ids"] == word_tokenizer(True)("hello world")["input_ids"]


def test_sft_on_a_selection(tmp_path, base):
    """`davir sft --selection` trains on exactly the selected rows of every pool."""
    rows = [json.loads(x) for x in _data(tmp_path / "a.jsonl", 10).read_text().splitlines()]
    sel = tmp_path / "sel"
    # A hand-made selection output in the layout `davir select` writes.
    sel.mkdir()
    (sel / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (sel / "manifest.json").write_text(
        json.dumps(
            {
                "pools": [
                    {
                        "name": "a",
                        "file": "a.jsonl",
                        "format": "prompt_response",
                        "template": "plain",
                    }
                ]
            }
        )
    )
    cfg = _cfg(
        tmp_path, base, tmp_path / "unused.jsonl", train={"selection": str(sel), "epochs": 2}
    )
    out = sft(cfg, progress=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["examples_seen"] == 8  # 4 selected examples, 2 epochs
