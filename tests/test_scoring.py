"""The scoring job: per-example NLLs equal transformers PyTorch's; 8 devices equal 1; packed
equals padded; killed-and-resumed equals uninterrupted; other runs' outputs are never mixed; a
real two-process (jax.distributed, gloo) run equals one process."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from toy_tokenizers import WORDS

from davir_jax.config import Config, ScoringConfig
from davir_jax.core.runs import MixedRunError
from davir_jax.core.sharding import make_mesh
from davir_jax.data.config import DataConfig
from davir_jax.jobs.score import score
from davir_jax.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
PLAIN_WORDS = [w for w in WORDS if w.isalpha()]


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    pick = lambda k: " ".join(rng.choice(PLAIN_WORDS, k))  # noqa: E731
    return [
        {"prompt": pick(rng.integers(2, 12)), "response": pick(rng.integers(1, 16))}
        for _ in range(n)
    ]


def _cfg(tmp_path, root, path, out="out", **kw) -> Config:
    d = {"path": str(path), "cache_dir": str(tmp_path / "cache"), "batch_rows": 8, "max_len": 64}
    d.update(kw.pop("data", {}))
    s = {
        "base": str(root / "base"),
        "reference": str(root / "reference"),
        "out": str(tmp_path / out),
        "shard_batches": 2,
    }
    s.update(kw.pop("scoring", {}))
    model = ModelConfig(**kw.pop("model", {}))
    return Config(model=model, data=DataConfig(**d), scoring=ScoringConfig(**s))


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _table(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    return {r["example_id"]: r for r in rows}


def _torch_nll(model, tok, prompt: str, response: str) -> tuple[float, int]:
    import torch

    ids = (
        tok(prompt)["input_ids"]
        + tok(response, add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )
    n_prompt = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    nll = -sum(float(lp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
    return nll, len(ids) - n_prompt


@pytest.mark.parametrize("attn_block", [0, 16])  # dense [T, T] scores; 16-token blocks
def test_nll_equals_transformers_pytorch(tmp_path, models, attn_block):
    root, hf, tok = models
    rows = _rows(30) + [{"prompt": "hello", "response": ""}]  # one bad row: counted
    data = _write(tmp_path / "pool.jsonl", rows)
    out = score(_cfg(tmp_path, root, data, model={"attn_block": attn_block}), progress=False)
    table = _table(out)
    assert len(table) == 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"empty_response": 1} and manifest["complete"]
    assert manifest["data"]["format"] == "prompt_response" and manifest["template"] == "plain"
    assert set(manifest["fingerprints"]) >= {"base", "reference", "tokenizer", "data"}
    for i, row in enumerate(rows[:30]):
        r = table[f"pool:{i}"]
        for m, col in (("base", "nll_base"), ("reference", "nll_ref")):
            nll, n = _torch_nll(hf[m], tok, row["prompt"], row["response"])
            assert r["n_tokens"] == n
            np.testing.assert_allclose(r[col], nll, rtol=1e-4)
        assert json.loads(r["record"]) == row and r["row"] == i and r["source"] == "pool"
    assert (out / "diagnostics.md").is_file() and (out / "diagnostics_vs_length.png").is_file()


def _torch_alone_nll(model, tok, response: str) -> float:
    """IFD's L(y): the same response ids after one start token (the BOS), every one scored."""
    import torch

    ids = [tok.bos_token_id] + tok(response, add_special_tokens=False)["input_ids"]
    ids.append(tok.eos_token_id)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return -sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)))


def _torch_embedding(model, tok, row: dict) -> np.ndarray:
    import torch

    prompt = tok(row["prompt"])["input_ids"]
    ids = prompt + tok(row["response"], add_special_tokens=False)["input_ids"]
    ids.append(tok.eos_token_id)
    with torch.no_grad():
        h = model.model(torch.tensor([ids])).last_hidden_state[0].double()
    return h[len(prompt) :].mean(0).numpy()


@pytest.mark.devices(8)
def test_ifd_columns_equal_transformers_pytorch(tmp_path, models):
    """The response-alone NLLs of base, reference and a third (proxy) model, in the same pass,
    equal PyTorch's per example; packed on 8 devices; the IFD scores are their ratios."""
    from hf_models import make_hf_model

    from davir_jax.core.scores import compute_scores, read_scores

    root, hf, tok = models
    proxy = make_hf_model("llama", tmp_path / "proxy", seed=2)
    tok.save_pretrained(tmp_path / "proxy")
    rows = _rows(21, seed=8)
    data = _write(tmp_path / "pool.jsonl", rows)
    scoring = {"proxy": str(tmp_path / "proxy"), "ifd": ["base", "reference"], "embed": "base"}
    out = score(_cfg(tmp_path, root, data, scoring=scoring, model={"attn_block": 16}), False)
    table = _table(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ifd"] == ["base", "reference", "proxy"] and "proxy" in manifest["fingerprints"]
    for i, row in enumerate(rows):
        r = table[f"pool:{i}"]
        for model, col in (
            (hf["base"], "nll_base"),
            (hf["reference"], "nll_ref"),
            (proxy, "nll_proxy"),
        ):
            np.testing.assert_allclose(
                r[col], _torch_nll(model, tok, row["prompt"], row["response"])[0], rtol=1e-4
            )
            np.testing.assert_allclose(
                r[col + "_alone"], _torch_alone_nll(model, tok, row["response"]), rtol=1e-4
            )
    s = compute_scores(read_scores(out), ["ifd", "ifd_ref", "superfiltering", "ifd_per_token"])
    lb = np.array([table[f"pool:{i}"]["nll_base"] for i in range(21)])
    alone = np.array([table[f"pool:{i}"]["nll_base_alone"] for i in range(21)])
    np.testing.assert_allclose(s["ifd"], lb / alone, rtol=1e-12)
    assert "ifd" in json.loads((out / "diagnostics.json").read_text())["scores"]
    # The base's final-norm hidden states mean-pooled over the response, rows as the table.
    emb = np.load(out / "embeddings.npy", allow_pickle=False)
    order = read_scores(out).column("example_id").to_pylist()
    assert emb.shape == (21, 64) and emb.dtype == np.float32
    for i in (0, 7, 20):
        np.testing.assert_allclose(
            emb[order.index(f"pool:{i}")], _torch_embedding(hf["base"], tok, rows[i]), atol=1e-4
        )


def test_proxy_alone_run_scores_superfiltering_and_resumes(tmp_path, models):
    """A run with only a proxy (Superfiltering: no base, no reference) writes null base and
    reference columns, and its shards resume: a rerun of a complete run is a no-op with the same
    table, and a run that lost its response-alone shards recomputes just them."""
    from davir_jax.core.scores import available_scores, read_scores

    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(12, seed=9))
    scoring = {"base": None, "reference": None, "proxy": str(root / "base")}
    cfg = _cfg(tmp_path, root, data, scoring=scoring, data={"pack": False})
    out = score(cfg, False)
    t = read_scores(out)
    assert t.column("nll_base").null_count == t.column("nll_ref").null_count == 12
    assert {"superfiltering", "superfiltering_per_token"} <= set(available_scores(t))
    assert "davir" not in available_scores(t)
    first = _table(out)
    for f in (out / "shards" / "proxy_alone").glob("*.parquet"):
        f.unlink()
    (out / "scores.parquet").unlink()
    assert _table(score(cfg, False)) == first
    with pytest.raises(ValueError, match=r"scoring.ifd or scoring.embed names reference"):
        score(_cfg(tmp_path, root, data, "x", scoring={**scoring, "ifd": ["reference"]}), False)


@pytest.mark.devices(8)
def test_eight_devices_equal_one_and_packed_equals_padded(tmp_path, models):
    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(37, seed=1))
    one = _table(
        score(_cfg(tmp_path, root, data, "one"), False, make_mesh(1, 1, 1, jax.devices()[:1]))
    )
    # 8 devices also run the blocked attention (64-token rows, 16-token blocks), sharded.
    cfg8 = _cfg(tmp_path, root, data, "eight", model={"attn_block": 16})
    eight = _table(score(cfg8, False, make_mesh(1, 4, 2)))
    padded = _table(score(_cfg(tmp_path, root, data, "pad", data={"pack": False}), False))
    assert one.keys() == eight.keys() == padded.keys() and len(one) == 37
    for k in one:
        for other in (eight, padded):
            assert other[k]["n_tokens"] == one[k]["n_tokens"]
            for col in ("nll_base", "nll_ref"):
                np.testing.assert_allclose(other[k][col], one[k][col], rtol=1e-5)


def test_sequential_equals_both_resident(tmp_path, models):
    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(20, seed=2))
    both = _table(score(_cfg(tmp_path, root, data, "both"), False))
    seq = _table(
        score(_cfg(tmp_path, root, data, "seq", scoring={"resident": "sequential"}), False)
    )
    for k in both:
        np.testing.assert_allclose(seq[k]["nll_base"], both[k]["nll_base"], rtol=1e-6)
        np.testing.assert_allclose(seq[k]["nll_ref"], both[k]["nll_ref"], rtol=1e-6)


def test_mixing_is_refused_unless_overwrite(tmp_path, models):
    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(10, seed=3))
    cfg = _cfg(tmp_path, root, data)
    score(cfg, False)
    swapped = dataclasses.replace(
        cfg, scoring=dataclasses.replace(cfg.scoring, base=cfg.scoring.reference)
    )
    with pytest.raises(MixedRunError, match="different models"):
        score(swapped, False)
    other_template = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template="alpaca"))
    with pytest.raises(MixedRunError, match="different data"):
        score(other_template, False)
    over = dataclasses.replace(
        swapped, scoring=dataclasses.replace(swapped.scoring, overwrite=True)
    )
    t = _table(score(over, False))
    assert len(t) == 10
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(MixedRunError, match="not a scoring run"):
        score(
            dataclasses.replace(
                cfg, scoring=dataclasses.replace(cfg.scoring, out=str(tmp_path / "junk"))
            ),
            False,
        )


def _cli(args: list[str]):
    return run_cli("score", args)


def test_cpu_mesh_preset_through_the_cli_equals_one_device(tmp_path, models):
    """`configs/mesh/cpu.yaml` splits a fresh `davir score` process into CPU devices (pinned
    to 2 here) with the batch split over them: the same table as one device."""
    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(29, seed=6))
    one = _table(
        score(_cfg(tmp_path, root, data, "one"), False, make_mesh(1, 1, 1, jax.devices()[:1]))
    )
    args = ["--config", str(ROOT / "configs" / "mesh" / "cpu.yaml"), "--mesh.cpu_devices=2"]
    args += ["--data", str(data), "--base", str(root / "base"), "--reference"]
    args += [str(root / "reference"), "--out", str(tmp_path / "cpu"), "-q"]
    args += [f"--data.cache_dir={tmp_path / 'cache'}", "--data.batch_rows=8"]
    proc = _cli(args + ["--data.max_len=64", "--scoring.shard_batches=2"])
    assert proc.wait(timeout=600) == 0, proc.stdout.read().decode()
    manifest = json.loads((tmp_path / "cpu" / "manifest.json").read_text())
    assert manifest["devices"] == {"platform": "cpu", "count": 2, "processes": 1}
    assert manifest["config"]["mesh"]["data"] == -1  # filled: 2 data-parallel devices
    two = _table(tmp_path / "cpu")
    assert two.keys() == one.keys() and len(one) == 29
    for k in one:
        assert two[k]["n_tokens"] == one[k]["n_tokens"]
        for col in ("nll_base", "nll_ref"):
            np.testing.assert_allclose(two[k][col], one[k][col], rtol=1e-5)


def kill_resume_args(root: Path, cache: Path) -> list[str]:
    """`davir score` options of the kill-and-resume tests: one batch of two rows per shard, so
    a run writes many shards and can be killed between them."""
    return [
        "--base",
        str(root / "base"),
        "--reference",
        str(root / "reference"),
        f"--data.cache_dir={cache}",
        "--data.batch_rows=2",
        "--data.max_len=64",
        "--data.pack=false",
        "--scoring.shard_batches=1",
        "-q",
    ]


def test_killed_and_resumed_equals_uninterrupted(tmp_path, models):
    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(400, seed=4))
    common = ["--data", str(data), *kill_resume_args(root, tmp_path / "cache")]
    full = _cli(common + ["--out", str(tmp_path / "full")])
    assert full.wait(timeout=600) == 0, full.stdout.read().decode()
    out = tmp_path / "killed"
    shards = out / "shards" / "reference"
    proc = _cli(common + ["--out", str(out)])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("p*.parquet"))) >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(shards.glob("p*.parquet")))
    assert not (out / "scores.parquet").exists() and n_done < 100
    resumed = _cli(common + ["--out", str(out)])
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()
    a, b = _table(tmp_path / "full"), _table(out)
    assert a == b  # bit-identical rows, no duplicate or missing id
    assert len(a) == 400


WORKER = """
import os, sys, json
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from davir_jax.config import load_config
from davir_jax.jobs.score import score
cfg = load_config(None, json.loads(sys.argv[3]))
score(cfg, progress=False)
print("process", jax.process_index(), "of", jax.process_count(), "devices", len(jax.devices()))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_equals_one_process(tmp_path, models):
    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(45, seed=5))
    one = _table(score(_cfg(tmp_path, root, data, "one"), False))
    overrides = [
        f"--data.path={data}",
        f"--data.cache_dir={tmp_path / 'cache2'}",
        "--data.batch_rows=8",
        "--data.max_len=64",
        f"--scoring.base={root / 'base'}",
        f"--scoring.reference={root / 'reference'}",
        f"--scoring.out={tmp_path / 'two'}",
        "--scoring.shard_batches=2",
    ]
    addr = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, addr, str(i), json.dumps(overrides)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    assert "process 1 of 2 devices 8" in logs[1]
    assert sorted(p.name for p in (tmp_path / "two" / "shards" / "base").iterdir())[0].startswith(
        "p00000"
    )
    assert any(
        p.name.startswith("p00001") for p in (tmp_path / "two" / "shards" / "base").iterdir()
    )
    two = _table(tmp_path / "two")
    assert two.keys() == one.keys()
    for k in one:
        assert two[k]["n_tokens"] == one[k]["n_tokens"]
        np.testing.assert_allclose(two[k]["nll_base"], one[k]["nll_base"], rtol=1e-5)
        np.testing.assert_allclose(two[k]["nll_ref"], one[k]["nll_ref"], rtol=1e-5)


def test_score_then_select_a_mixture_through_the_cli(tmp_path, models, capsys):
    from davir_jax.cli import main
    from davir_jax.data.readers import read_examples

    root, _, _ = models
    words = _rows(24, seed=6)
    alpaca = _write(
        tmp_path / "alpaca.jsonl",
        [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in words],
    )
    gsm = _write(
        tmp_path / "gsm.jsonl",
        [{"question": r["prompt"], "answer": r["response"]} for r in _rows(6, seed=7)],
    )
    for path in (alpaca, gsm):
        rc = main(
            [
                "score",
                "--data",
                str(path),
                "--template",
                "alpaca",
                "--base",
                str(root / "base"),
                "--reference",
                str(root / "reference"),
                "--out",
                str(tmp_path / path.stem),
                f"--data.cache_dir={tmp_path / 'cache'}",
                "--data.max_len=128",
                "-q",
            ]
        )
        assert rc == 0
    rc = main(
        [
            "select",
            f"a={tmp_path / 'alpaca'}:fraction=0.25",
            f"g={tmp_path / 'gsm'}:all",
            "--method",
            "davir",
            "--out",
            str(tmp_path / "sel"),
        ]
    )
    assert rc == 0
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert [p["n_selected"] for p in manifest["pools"]] == [6, 6]
    table = _table(tmp_path / "alpaca")
    score_of = {k: (r["nll_base"] - r["nll_ref"]) / r["nll_base"] for k, r in table.items()}
    top = sorted(score_of, key=lambda k: (-score_of[k], k))[:6]
    picked = [e["example_id"] for e in manifest["selected"] if e["pool"] == "a"]
    assert picked == top
    back = list(read_examples(tmp_path / "sel" / "a.jsonl", "alpaca"))
    assert [json.loads(e.record) for e in back] == [json.loads(table[k]["record"]) for k in top]
    assert "6 of 24" in capsys.readouterr().out
    # The SFT trainer reads the selection directly: 6 + 6 examples per epoch.
    rc = main(
        [
            "sft",
            "--model",
            str(root / "base"),
            "--selection",
            str(tmp_path / "sel"),
            "--out",
            str(tmp_path / "sft"),
            "--train.epochs=1",
            f"--data.cache_dir={tmp_path / 'c2'}",
            "--data.max_len=128",
            "-q",
        ]
    )
    assert rc == 0
    recs = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["examples_seen"] == 12
    assert main(["score", "--data", str(alpaca), "--out", str(tmp_path / "x"), "-q"]) == 2


def test_a_shard_without_real_rows_still_has_the_embedding_column(tmp_path):
    """A process whose slice of a shard is all filler writes the embedding column too, so the
    merge can concatenate every process's shards (and the embeddings keep their rows)."""
    import pyarrow as pa

    from davir_jax.jobs.score import _Shard, _write_embeddings

    class View:
        example_ids, rows = ["a:0", "a:1"], np.array([0, 1])

    class FakeBatch:
        example_index = np.array([[0], [1]])

    full = _Shard(embed_dim=3)
    full.add(View, FakeBatch, np.ones((2, 1)), np.ones((2, 1)), np.arange(6.0).reshape(2, 1, 3))
    empty = _Shard(embed_dim=3)
    full.write(tmp_path / "p0.parquet")
    empty.write(tmp_path / "p1.parquet")
    t = pa.concat_tables([pq.read_table(tmp_path / f"p{i}.parquet") for i in (0, 1)])
    _write_embeddings(tmp_path, t.slice(1))  # an offset into the column
    np.testing.assert_array_equal(np.load(tmp_path / "embeddings.npy"), [[3.0, 4.0, 5.0]])
