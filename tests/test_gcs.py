"""gs:// paths against a real GCS JSON API on loopback (issue 19): `gcp-storage-emulator`,
started by the fixture on 127.0.0.1 and stopped after (tests/gcs_emulator.py), with gcsfs
pointed at it. Data files stream from the bucket, scoring writes its shards and table into it
and resumes after kill -9, publishing stays atomic (one object, or a folder with its commit
marker), and errors name the URL."""

from __future__ import annotations

import gzip
import json
import os
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from gcs_emulator import gcs_emulator_fixture
from test_pipeline import tiny_smol  # noqa: F401  (a fixture)
from test_scoring import _rows, _table, kill_resume_args

from davir_jax.core import storage
from davir_jax.core.io import atomic_dir, atomic_file, publish_dir, write_json
from davir_jax.data.readers import iter_rows
from davir_jax.data.skips import SkipLog

gcs = gcs_emulator_fixture()


@pytest.fixture(autouse=True)
def _remote_cache(tmp_path, monkeypatch):
    """Copies of remote model sources in the test's folder, not the user's cache."""
    monkeypatch.setenv("DAVIR_REMOTE_CACHE", str(tmp_path / "remote-cache"))


def _upload_text(gcs, url: str, text: str | bytes) -> str:
    gcs.fs.pipe(url, text.encode() if isinstance(text, str) else text)
    return url


def _bucket_table(url: str) -> dict[str, dict]:
    rows = storage.read_parquet(f"{url}/scores.parquet").to_pylist()
    return {r["example_id"]: r for r in rows}


def test_data_files_stream_from_the_bucket(gcs, tmp_path):
    root = gcs.bucket("data")
    rows = _rows(30, seed=1)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(text)
    _upload_text(gcs, f"{root}/a.jsonl", text)
    _upload_text(gcs, f"{root}/a.jsonl.gz", gzip.compress(text.encode()))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=7)
    _upload_text(gcs, f"{root}/a.parquet", buf.getvalue().to_pybytes())
    local = [r.value for r in iter_rows(tmp_path / "a.jsonl", SkipLog())]
    for name in ("a.jsonl", "a.jsonl.gz", "a.parquet"):
        got = list(iter_rows(f"{root}/{name}", SkipLog(), part=0, num_parts=1))
        assert [r.value for r in got] == local, name
        assert got[3].location.startswith(f"{root}/{name}")  # bad rows would name the URL
    # Another process's part: every second row.
    odd = [r.row for r in iter_rows(f"{root}/a.parquet", SkipLog(), part=1, num_parts=2)]
    assert odd == list(range(1, 30, 2))


def test_a_file_is_one_object_published_whole(gcs):
    root = gcs.bucket("out")
    url = f"{root}/run/result.json"
    write_json(url, {"a": 1})
    assert json.loads(storage.upath(url).read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), atomic_file(url) as f:
        f.write(b'{"a": 2, "half')
        raise RuntimeError("killed mid-write")
    assert json.loads(storage.upath(url).read_text()) == {"a": 1}  # the old object, whole


def test_a_folder_is_published_with_its_marker_last(gcs):
    root = gcs.bucket("out")
    url = f"{root}/model"
    assert not storage.is_published(url)
    with atomic_dir(url) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"weights")
        (tmp / "config.json").write_text("{}")
        assert not storage.is_published(url)  # nothing visible while it is built
    assert storage.is_published(url)
    marker = json.loads(storage.upath(f"{url}/{storage.PUBLISHED}").read_text())
    assert marker["files"] == ["config.json", "sub/w.bin"]
    assert storage.read_bytes(f"{url}/sub/w.bin") == b"weights"
    # Republishing replaces every old object; a failed build changes nothing.
    with atomic_dir(url) as tmp:
        (tmp / "config.json").write_text('{"v": 2}')
    assert not storage.upath(f"{url}/sub/w.bin").exists()
    with pytest.raises(RuntimeError), atomic_dir(url) as tmp:
        (tmp / "config.json").write_text("broken")
        raise RuntimeError("build failed")
    assert storage.upath(f"{url}/config.json").read_text() == '{"v": 2}'
    # Promoting one bucket folder to another (a run's best epoch to its model) needs a
    # complete source: one without its marker is refused before the target is touched.
    gcs.fs.pipe(f"{root}/half/config.json", b"{}")
    with pytest.raises(FileNotFoundError, match=r"half: not a published folder"):
        publish_dir(f"{root}/half", url)
    assert storage.is_published(url)
    with atomic_dir(f"{root}/best") as tmp:
        (tmp / "config.json").write_text('{"v": 3}')
    publish_dir(f"{root}/best", url)
    assert storage.upath(f"{url}/config.json").read_text() == '{"v": 3}'
    assert storage.is_published(url) and not storage.upath(f"{root}/best").exists()


def test_a_copy_taken_while_republished_is_taken_again(gcs, tmp_path, monkeypatch):
    """`download_published` compares the marker before and after copying: a folder republished
    meanwhile (its files may mix two versions) is copied again, and refused after three tries."""
    root = gcs.bucket("out")
    with atomic_dir(f"{root}/m") as tmp:
        (tmp / "a.txt").write_text("a")
    real = storage._marker
    calls = []

    def moving(url):  # a new publication id at every look
        calls.append(1)
        m = real(url)
        return None if m is None else {**m, "id": str(len(calls))}

    monkeypatch.setattr(storage, "_marker", moving)
    with pytest.raises(OSError, match="republished while it was being copied"):
        storage.download_published(f"{root}/m", tmp_path / "copy")
    assert not (tmp_path / "copy").exists() and len(calls) == 6
    monkeypatch.setattr(storage, "_marker", real)
    storage.download_published(f"{root}/m", tmp_path / "copy")
    assert (tmp_path / "copy" / "a.txt").read_text() == "a"


def test_errors_name_the_url(gcs, tmp_path):
    from davir_jax.cli import main

    root = gcs.bucket("data")
    with pytest.raises(FileNotFoundError, match=rf"{root}/nope.jsonl: no such file or object"):
        storage.upath(f"{root}/nope.jsonl").open("rb")
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/x.jsonl: no bucket"):
        storage.read_bytes("gs://no-such-bucket/x.jsonl")
    rc = main(["score", "--data", f"{root}/nope.jsonl", "--base", "x", "--out", str(tmp_path)])
    assert rc == 2
    # Refused access and missing credentials (which the emulator does not check) become
    # PermissionErrors naming the URL and where credentials come from.
    for err in (_HttpError(403, "Forbidden"), _Named("DefaultCredentialsError", "no creds")):
        with pytest.raises(PermissionError, match=r"gs://b/x: reading refused .*credentials"):
            with storage.named_errors("gs://b/x", "reading"):
                raise err


class _HttpError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def _Named(kind: str, msg: str) -> Exception:
    return type(kind, (Exception,), {})(msg)


def test_score_from_the_bucket_into_the_bucket_killed_and_resumed(gcs, tmp_path, models):
    """`davir score` reads its data from gs:// and writes shards, table and manifest to gs://;
    killed with SIGKILL after some shards, the rerun resumes and gives the table of an
    uninterrupted local run, bit for bit."""
    root, _, _ = models
    bucket = gcs.bucket("runs")
    rows = _rows(120, seed=4)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "pool.jsonl").write_text(text)
    _upload_text(gcs, f"{bucket}/pool.jsonl", text)
    common = kill_resume_args(root, tmp_path / "cache")
    local = run_cli("score", common + ["--data", str(tmp_path / "pool.jsonl"), "--out",
                                       str(tmp_path / "local")])  # fmt: skip
    assert local.wait(timeout=600) == 0, local.stdout.read().decode()
    out = f"{bucket}/scored"
    args = common + ["--data", f"{bucket}/pool.jsonl", "--out", out]
    proc = run_cli("score", args)
    deadline = time.time() + 300
    shards = f"{out}/shards/reference"
    while time.time() < deadline and proc.poll() is None:
        gcs.fs.invalidate_cache()
        if len(gcs.fs.glob(f"{shards}/p*.parquet")) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gcs.fs.invalidate_cache()
    assert not gcs.fs.exists(f"{out}/scores.parquet")
    assert len(gcs.fs.glob(f"{shards}/p*.parquet")) < 60
    resumed = run_cli("score", args)
    log = resumed.stdout.read().decode()
    assert resumed.wait(timeout=600) == 0, log
    a, b = _table(tmp_path / "local"), _bucket_table(out)
    assert len(a) == 120
    assert a == b  # bit-identical rows, no duplicate or missing id
    manifest = json.loads(storage.upath(f"{out}/manifest.json").read_text())
    assert manifest["data"]["path"] == f"{bucket}/pool.jsonl"


def test_sft_checkpoints_and_model_in_the_bucket_resume(gcs, tmp_path, base):
    """`davir sft --train.out gs://...`: orbax checkpoints (tensorstore's GCS driver), metrics,
    steps and the final model land in the bucket; a rerun without the model and the last
    checkpoint restores step 2 from the bucket and redoes steps 3-4 exactly; the model loads
    back from its URL with the logits of a local run."""
    import dataclasses

    import numpy as np
    from test_train import _cfg, _data, _losses

    from davir_jax.jobs.sft import sft
    from davir_jax.models import load_model

    bucket = gcs.bucket("runs")
    data = _data(tmp_path / "d.jsonl", 24)
    local_cfg = _cfg(tmp_path, base, data, "local", train={"max_steps": 4})
    local = sft(local_cfg, progress=False)
    url = f"{bucket}/sft"
    cfg = dataclasses.replace(local_cfg, train=dataclasses.replace(local_cfg.train, out=url))
    out = sft(cfg, progress=False)
    assert str(out) == url
    losses = _losses(storage.upath(url))
    assert losses == _losses(local)
    gcs.fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in gcs.fs.ls(f"{url}/checkpoints")) == ["2", "4"]
    assert storage.is_published(f"{url}/model")
    ids = np.arange(12).reshape(1, 12) % 30
    want = np.asarray(load_model(local)(ids))
    np.testing.assert_array_equal(np.asarray(load_model(url)(ids)), want)
    # Resume from the bucket.
    gcs.fs.rm(f"{url}/model", recursive=True)
    gcs.fs.rm(f"{url}/checkpoints/4", recursive=True)
    gcs.fs.invalidate_cache()
    sft(cfg, progress=False)
    assert _losses(storage.upath(url)) == losses
    np.testing.assert_array_equal(np.asarray(load_model(url)(ids)), want)
    # Each publication is copied once: the republished model is a second local copy.
    assert len(list((tmp_path / "remote-cache").iterdir())) == 2


@pytest.mark.slow
def test_pipeline_runs_with_out_in_the_bucket(gcs, tmp_path, tiny_smol, capsys):  # noqa: F811
    """`davir demo --out gs://...`: every stage writes into the bucket (scores, selections,
    SFT runs and checkpoints, evaluations, the report and its PNGs), and a rerun finds every
    stage done there."""
    from davir_jax.cli import main

    run = f"{gcs.bucket('runs')}/demo"
    args = [
        "demo",
        "--out",
        run,
        f"--model.source={tiny_smol}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.batch_rows=8",
        "--train.epochs=1",
        "--pipeline.seeds=1",
        "--sizes=40,8,16",
        "--pipeline.generate=4",
        "--eval.max_new_tokens=2",
        "-q",
    ]
    assert main(args) == 0
    report = storage.upath(f"{run}/report.md").read_text()
    assert "## Held-out results" in report
    assert storage.read_bytes(f"{run}/results.png")[:4] == b"\x89PNG"
    for name in ("base", "full", "davir-fraction0.15-s0"):
        assert json.loads(storage.upath(f"{run}/eval/{name}/eval.json").read_text())
    assert storage.is_published(f"{run}/reference/model")
    sel = json.loads(storage.upath(f"{run}/select/davir-fraction0.15-s0/manifest.json").read_text())
    assert sel["pools"][0]["n_selected"] == 6  # 15% of the 40-example pool
    capsys.readouterr()
    assert main(args) == 0
    assert "done before, skipped" in capsys.readouterr().err
    assert not os.path.exists("gs:")  # nothing went to a local folder named after the URL


@pytest.mark.slow
def test_two_processes_score_into_the_bucket_killed_and_resumed(gcs, tmp_path, models):
    """Two processes (the pod runtime on one machine, sharing no disk: each its own local
    mirror) read the data from the bucket, keep the token cache in it (each tokenizes its part,
    publishes it and fetches the other's) and each write their own shards into it; both killed
    with SIGKILL mid-run, both rerun: the table equals one process's local table (the
    per-process split changes only float summation order, as in test_scoring's two-process
    test)."""
    import subprocess
    import sys

    import numpy as np
    from test_scoring import ROOT, WORKER, _cfg, _free_port, _write

    from davir_jax.jobs.score import score

    root, _, _ = models
    rows = _rows(64, seed=5)
    data = _write(tmp_path / "pool.jsonl", rows)
    one = _table(score(_cfg(tmp_path, root, data, "one", scoring={"shard_batches": 1}), False))
    bucket = gcs.bucket("runs")
    _upload_text(gcs, f"{bucket}/pool.jsonl", data.read_text())
    out = f"{bucket}/two"
    overrides = [
        f"--data.path={bucket}/pool.jsonl",
        f"--data.cache_dir={bucket}/cache",  # each "host" keeps its own local mirror
        "--data.batch_rows=8",
        "--data.max_len=64",
        f"--scoring.base={root / 'base'}",
        f"--scoring.reference={root / 'reference'}",
        f"--scoring.out={out}",
        "--scoring.shard_batches=1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)

    def start() -> list[subprocess.Popen]:
        addr = f"127.0.0.1:{_free_port()}"
        return [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, addr, str(i), json.dumps(overrides)],
                cwd=ROOT,
                env={**env, "DAVIR_REMOTE_CACHE": str(tmp_path / f"host{i}")},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i in range(2)
        ]

    procs = start()
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        gcs.fs.invalidate_cache()
        if len(gcs.fs.glob(f"{out}/shards/reference/p*.parquet")) >= 2:
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    gcs.fs.invalidate_cache()
    assert not gcs.fs.exists(f"{out}/scores.parquet")
    procs = start()
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    (store,) = gcs.fs.ls(f"{bucket}/cache")
    parts = sorted(p.rsplit("/", 1)[1] for p in gcs.fs.ls(store))
    assert parts == ["part-00000-of-00002", "part-00001-of-00002"], parts
    for host in ("host0", "host1"):  # each host has both parts locally
        (mirror,) = (tmp_path / host / "tokens").iterdir()
        assert len(list(next(mirror.iterdir()).glob("part-*"))) == 2
    names = [p.rsplit("/", 1)[1] for p in gcs.fs.ls(f"{out}/shards/base")]
    assert any(n.startswith("p00000") for n in names) and any(n.startswith("p00001") for n in names)
    two = _bucket_table(out)
    assert two.keys() == one.keys()
    for k in one:
        assert two[k]["n_tokens"] == one[k]["n_tokens"]
        for col in ("nll_base", "nll_ref"):
            np.testing.assert_allclose(two[k][col], one[k][col], rtol=1e-5)


def test_a_token_cache_in_the_bucket_is_fetched_not_rebuilt(gcs, tmp_path, models, monkeypatch):
    """With `data.cache_dir` a URL, the first run tokenizes and publishes its part; a run on a
    host without the local mirror fetches it (tokenizing nothing) and scores the same table."""
    import shutil

    from test_scoring import _cfg, _write

    from davir_jax.data import dataset
    from davir_jax.jobs.score import score

    root, _, _ = models
    bucket = gcs.bucket("runs")
    data = _write(tmp_path / "pool.jsonl", _rows(20, seed=3))
    cfg = _cfg(tmp_path, root, data, "a", data={"cache_dir": f"{bucket}/cache"})
    a = _table(score(cfg, False))
    assert gcs.fs.glob(f"{bucket}/cache/*/part-00000-of-00001/{storage.PUBLISHED}")
    shutil.rmtree(tmp_path / "remote-cache" / "tokens")

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of fetching the published part")

    monkeypatch.setattr(dataset, "_tokenize_part", refuse)
    b = _table(score(_cfg(tmp_path, root, data, "b", data={"cache_dir": f"{bucket}/cache"}), False))
    assert a == b
    # A host whose local part is complete but whose upload never finished (killed, or the
    # bucket's copy deleted) publishes it on the rerun instead of leaving the others waiting.
    (part,) = gcs.fs.glob(f"{bucket}/cache/*/part-00000-of-00001")
    gcs.fs.rm(part, recursive=True)
    gcs.fs.invalidate_cache()
    c = _table(score(_cfg(tmp_path, root, data, "c", data={"cache_dir": f"{bucket}/cache"}), False))
    assert c == a
    assert storage.is_published(f"gs://{part}")


def test_a_url_that_lost_a_slash_is_refused(tmp_path):
    """`Path("gs://b/x")` is the local `gs:/b/x`: writing there is refused, naming it, instead
    of creating a local folder called `gs:`."""
    from pathlib import Path

    for bad in (Path("gs://b/x.json"), "gs:/b/x.json"):
        with pytest.raises(ValueError, match="a URL turned into a local path.*write gs://b/x.json"):
            write_json(bad, {})
        with pytest.raises(ValueError, match="a URL turned into a local path"):
            storage.upath(bad)
    assert not Path("gs:").exists()


def test_a_job_given_a_url_that_lost_a_slash_says_so(tmp_path, monkeypatch):
    """The command-line checks say what is wrong with `--data gs:/b/x` (not "no such file")
    and create no local folder `gs:` for `--out gs:/b/x`."""
    from davir_jax.core.errors import UserError
    from davir_jax.engine.preflight import input_path, writable_dir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="data.path: gs:/b/x.jsonl: a URL turned .* gs://b/x.jsonl"):
        input_path("gs:/b/x.jsonl", "data.path")
    with pytest.raises(UserError, match="scoring.out: gs:/b/run: a URL turned .* gs://b/run"):
        writable_dir("gs:/b/run", "scoring.out")
    assert list(tmp_path.iterdir()) == []


def test_exports_and_selections_go_to_the_bucket(gcs, tmp_path, base, models):
    """`davir export` (merged HF and PEFT) and `davir select` write into the bucket; the HF
    export loads back through its URL as a model source with the same logits."""
    import numpy as np
    from test_scoring import _cfg, _write

    from davir_jax.cli import main
    from davir_jax.config import Config
    from davir_jax.jobs.score import score
    from davir_jax.models import load_model
    from davir_jax.models.config import LoraConfig
    from davir_jax.models.loading import save_lora
    from davir_jax.models.lora import apply_lora

    bucket = gcs.bucket("runs")
    assert main(["export", str(base), f"{bucket}/hf"]) == 0
    assert storage.is_published(f"{bucket}/hf")
    ids = np.arange(10).reshape(1, 10) % 30
    np.testing.assert_array_equal(
        np.asarray(load_model(f"{bucket}/hf")(ids)), np.asarray(load_model(base)(ids))
    )
    model = load_model(base)
    apply_lora(model, LoraConfig(rank=2), 0)
    save_lora(model, tmp_path / "lora", base, LoraConfig(rank=2))
    assert main(["export", str(tmp_path / "lora"), f"{bucket}/peft", "--peft"]) == 0
    files = storage.published_files(f"{bucket}/peft")
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    root, _, _ = models
    data = _write(tmp_path / "pool.jsonl", _rows(30, seed=2))
    cfg = _cfg(tmp_path, root, data, "s", scoring={"out": f"{bucket}/scores"})
    assert isinstance(cfg, Config)
    score(cfg, False)
    rc = main(["select", f"pool={bucket}/scores:fraction=0.2", "--method", "davir",
               "--out", f"{bucket}/sel"])  # fmt: skip
    assert rc == 0
    manifest = json.loads(storage.upath(f"{bucket}/sel/manifest.json").read_text())
    assert manifest["pools"][0]["n_selected"] == 6
    lines = storage.upath(f"{bucket}/sel/pool.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_the_emulator_lets_tensorstore_rewrite_a_manifest(gcs):
    """A second commit to an OCDBT database (what orbax does when one checkpoint's writes land
    in two commits) reads the manifest's generation from the download headers, as on GCS; the
    emulator alone omits them ("Malformed StorageGeneration", a flaky checkpoint failure)."""
    import tensorstore as ts

    gcs.bucket("runs")
    spec = {"driver": "ocdbt", "base": "gs://runs/db/"}
    ts.KvStore.open(spec).result().write("a", b"1").result()
    second = ts.KvStore.open(spec, context=ts.Context()).result()
    second.write("b", b"2").result()
    assert second.read("a").result().value == b"1" and second.read("b").result().value == b"2"
