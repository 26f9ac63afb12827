"""Validation during SFT (`train.val`): after every epoch the held-out response loss of the
current parameters (`nll.held_out_loss`) goes to DIR/val.json and metrics.jsonl;
`keep_best` exports the best epoch, `patience` stops when the loss stops improving, and a run
that crashes and is restarted keeps the history."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import _data

from davir_jax.config import Config
from davir_jax.core.sharding import make_mesh, state_shardings
from davir_jax.data.config import DataConfig
from davir_jax.engine.config import OptimizerConfig, TrainConfig
from davir_jax.engine.nll import held_out_loss
from davir_jax.engine.trainer import _manager, abstract_arrays, make_optimizer, optimizer_shardings
from davir_jax.jobs.sft import sft
from davir_jax.models import load_model
from davir_jax.models.config import ModelConfig


def _mesh():
    return make_mesh(1, 1, 1, jax.devices()[:1])


def _cfg(root: Path, base: Path, out: str) -> Config:
    # A high constant learning rate on 24 examples: the validation loss falls, then rises
    # (overfitting), so patience=1 stops the run and the best epoch is not the last.
    return Config(
        model=ModelConfig(source=str(base)),
        data=DataConfig(
            path=str(root / "train.jsonl"), cache_dir=str(root / "cache"), batch_rows=2, max_len=32
        ),
        optimizer=OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=0),
        train=TrainConfig(
            out=str(root / out),
            epochs=6,
            batch_examples=8,
            val=str(root / "val.jsonl"),
            patience=1,
            checkpoint_every=1,
            keep_checkpoints=100,
        ),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, base):
    root = tmp_path_factory.mktemp("val")
    _data(root / "train.jsonl", 24, seed=0)
    _data(root / "val.jsonl", 16, seed=5)
    cfg = _cfg(root, base, "full")
    out = sft(cfg, False, _mesh())
    return root, cfg, out


def _json(p: Path):
    return json.loads(p.read_text())


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _val_data(cfg: Config):
    from davir_jax.data.dataset import prepare
    from davir_jax.models.loading import load_tokenizer_for

    dc = DataConfig(
        path=cfg.train.val, cache_dir=cfg.data.cache_dir, batch_rows=2, max_len=cfg.data.max_len
    )
    return prepare(dc, load_tokenizer_for(cfg.model.source), progress=False)


def _checkpoint_params(cfg: Config, out: Path, step: int):
    """The parameters of checkpoint `step`, as a model (independent of the run's own restore)."""
    import orbax.checkpoint as ocp

    mesh = _mesh()
    graphdef, params = nnx.split(load_model(cfg.model.source, mesh=mesh))
    total = _json(out / "steps.json")["total_steps"]
    tx = make_optimizer(cfg.optimizer, total)
    psh = state_shardings(params, mesh)
    osh = optimizer_shardings(tx, params, psh, mesh)
    target = {
        "params": abstract_arrays(params, psh),
        "opt_state": abstract_arrays(jax.eval_shape(tx.init, params), osh),
    }
    mngr = _manager(out / "checkpoints", 100)
    got = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    mngr.close()
    return nnx.merge(graphdef, got["state"]["params"]), dict(got["meta"])


def test_val_json_holds_each_epochs_held_out_loss(run):
    root, cfg, out = run
    val = _json(out / "val.json")
    n = len(val["val_loss"])
    assert n >= 3 and val["epochs_run"] == n
    assert val["val_step"] == [3 * (k + 1) for k in range(n)]  # 24 examples, 8 per step
    data = _val_data(cfg)
    for loss, step in zip(val["val_loss"], val["val_step"]):
        model, meta = _checkpoint_params(cfg, out, step)
        want = held_out_loss(model, data)
        assert loss == pytest.approx(want["loss"], rel=1e-6)
        # The history is in the checkpoint's metadata (what a resumed run continues from).
        assert meta["val"]["val_loss"][-1] == loss and len(meta["val"]["val_loss"]) == step // 3
    assert val["n_val"] == 16 and val["n_val_tokens"] == want["n_tokens"]
    start = held_out_loss(load_model(cfg.model.source, mesh=_mesh()), data)["loss"]
    assert val["initial_val_loss"] == pytest.approx(start, rel=1e-6)
    # Every epoch's loss is in metrics.jsonl, on the record of the epoch's last step.
    m = {r["step"]: r for r in _metrics(out)}
    assert [m[s]["val_loss"] for s in val["val_step"]] == val["val_loss"]
    assert all("val_loss" not in r for s, r in m.items() if s not in val["val_step"])


def test_keep_best_exports_the_best_epoch(run):
    root, cfg, out = run
    val = _json(out / "val.json")
    best = int(np.argmin(val["val_loss"])) + 1
    assert val["best_epoch"] == best and val["exported_epoch"] == best and val["keep_best"]
    assert best < len(val["val_loss"])  # the last epoch is worse: keep_best matters here
    assert val["no_epoch_improved"] is False and min(val["val_loss"]) < val["initial_val_loss"]
    exported = nnx.state(load_model(out / "model"))
    best_model, _ = _checkpoint_params(cfg, out, val["best_step"])
    last_model, _ = _checkpoint_params(cfg, out, val["val_step"][-1])
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(nnx.state(best_model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    diff = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(nnx.state(last_model)))
    ]
    assert any(diff)
    assert not (out / "best").exists()  # moved into model/


def test_patience_stops_when_the_loss_stops_improving(run):
    root, cfg, out = run
    val = _json(out / "val.json")
    # patience=1: the first epoch without improvement is the last one run.
    assert val["stopped_early"] is True
    assert len(val["val_loss"]) == val["best_epoch"] + 1 < cfg.train.epochs
    assert val["val_loss"][-1] >= min(val["val_loss"][:-1])
    m = _metrics(out)
    assert m[-1]["step"] == val["val_step"][-1] < _json(out / "steps.json")["total_steps"]


def test_a_crashed_and_restarted_run_keeps_the_val_history(run, monkeypatch):
    """A run that dies mid-epoch after two validated epochs, restarted: the same history,
    losses and exported model as the uninterrupted run."""
    import davir_jax.engine.trainer as train_mod

    root, cfg_full, full = run
    want = _json(full / "val.json")
    crash_at = want["val_step"][1] + 2  # in the third epoch, after two evaluations
    real = train_mod.save_checkpoint

    class Crash(RuntimeError):
        pass

    def dying(mngr, step, state, meta):
        if step == crash_at:
            mngr.wait_until_finished()  # what is on disk is whole, as after a kill
            raise Crash(f"simulated crash at step {step}")
        real(mngr, step, state, meta)

    cfg = _cfg(root, Path(cfg_full.model.source), "crashed")
    monkeypatch.setattr(train_mod, "save_checkpoint", dying)
    with pytest.raises(Crash):
        sft(cfg, False, _mesh())
    out = Path(cfg.train.out)
    assert not (out / "model").exists()
    assert len(_json(out / "val.json")["val_loss"]) == 2
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    sft(cfg, False, _mesh())
    got = _json(out / "val.json")
    assert got == want
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(full)]
    for a, b in zip(
        jax.tree.leaves(nnx.state(load_model(out / "model"))),
        jax.tree.leaves(nnx.state(load_model(full / "model"))),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
