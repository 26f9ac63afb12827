"""Ordinary mistakes end in one clear line and exit status 2, before any expensive step:

* the error boundary of `davir` (OSError, YAML, config and data errors are one line; a bug keeps
  its traceback; `--debug` shows every traceback);
* every job checks all its inputs and outputs first (`davir_jax.engine.preflight`);
* a data file of which every row is skipped is one error naming the file and the reasons;
* every JSON file written is strict JSON;
* a run directory is locked: a second process into it stops at once, naming the holder.

Read-only locations: the tests run as root, for whom chmod does not make a directory read-only,
so they use sysfs: creating anything under /sys fails with EPERM and writing a file into
/sys/kernel with EACCES, even for root (skipped where /sys behaves otherwise).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from davir_jax.cli import main

ROWS = [{"prompt": "hello world how are you", "response": "i am fine"} for _ in range(6)]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _strict(text: str):
    """json.loads that refuses NaN and Infinity (as every other JSON parser does)."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _sys_read_only() -> tuple[str, str]:
    """(a directory that cannot be created, an existing directory that cannot be written)."""
    try:
        os.makedirs("/sys/davir-test-probe/out")
    except OSError:
        pass
    else:
        pytest.skip("/sys accepts new directories here")
    try:
        fd, p = tempfile.mkstemp(dir="/sys/kernel")
    except OSError:
        return "/sys/davir-test-probe/out", "/sys/kernel"
    os.close(fd)
    os.unlink(p)
    pytest.skip("/sys/kernel is writable here")


@pytest.fixture
def pool(tmp_path) -> Path:
    return _write(tmp_path / "pool.jsonl", ROWS)


def _score_args(base, pool, out, cache) -> list[str]:
    return [
        "score",
        "--data",
        str(pool),
        "--base",
        str(base),
        "--reference",
        str(base),
        "--out",
        str(out),
        f"--data.cache_dir={cache}",
        "--data.max_len=32",
        "--data.batch_rows=8",
        "-q",
    ]


# -- 1. the error boundary ---------------------------------------------------------------------


def test_out_naming_a_file_is_one_line(base, pool, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert main(_score_args(base, pool, out, tmp_path / "cache")) == 2
        err = capsys.readouterr().err
        assert err.startswith("davir score: error: scoring.out: ") and str(afile) in err
        assert "is a file, not a directory" in err and err.count("\n") == 1


def test_read_only_output_and_cache_directory(base, pool, tmp_path, capsys):
    cannot_create, cannot_write = _sys_read_only()
    assert main(_score_args(base, pool, cannot_create, tmp_path / "cache")) == 2
    err = capsys.readouterr().err
    assert err.startswith("davir score: error: scoring.out: cannot create /sys/davir-test-probe")
    assert main(_score_args(base, pool, tmp_path / "out", cannot_write)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"davir score: error: data.cache_dir: cannot write to {cannot_write}")
    assert "Traceback" not in err and err.count("\n") == 1


def test_malformed_yaml_override_names_the_key(capsys):
    assert main(["config", "--data.fields={a:"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("davir config: error: ") and "data.fields" in err and "{a:" in err
    assert "not valid YAML" in err and err.count("\n") == 1


def test_an_os_error_inside_a_command_is_one_line(base, tmp_path, capsys):
    # `davir export` has no preflight: the boundary alone turns its OSError into a line.
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "model"
    assert main(["export", str(base), str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("davir export: error: ") and str(tmp_path / "afile") in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback_and_debug_shows_every_traceback(monkeypatch, capsys):
    import davir_jax.cli as cli

    def bug(args, overrides):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_config", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["config"])
    monkeypatch.undo()
    for argv in (["--debug", "config", "--mesh.fsdpp=4"], ["config", "--mesh.fsdpp=4", "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "ConfigError" in err
        assert err.rstrip().splitlines()[-1].startswith("davir config: error: ")


# -- 2. every job checks every input and output before its first expensive step ----------------


@pytest.fixture
def no_work(monkeypatch):
    """Make the first expensive step of every job (tokenizing a data set) a test failure.

    Patched in every module that binds `prepare` by name (imported first), so the patch holds
    whatever the test order, and no module keeps the patched function after the test."""
    import importlib

    def refuse(*a, **k):
        raise AssertionError("a job started work before checking its inputs")

    names = ("data.dataset", "jobs.score", "jobs.evaluate", "jobs.sft", "jobs.dpo")
    # All imported before any is patched: a module first imported after the patch would bind
    # the patched function, and keep it after the undo.
    modules = [importlib.import_module(f"davir_jax.{name}") for name in names]
    for name, module in zip(names, modules):
        assert hasattr(module, "prepare"), f"davir_jax.{name} no longer binds prepare"
        monkeypatch.setattr(module, "prepare", refuse)


def _cfg(tmp_path, **sections):
    from davir_jax.config import load_config

    flags = [f"--data.cache_dir={tmp_path / 'cache'}"]
    for section, values in sections.items():
        flags += [f"--{section}.{k}={v}" for k, v in values.items()]
    return load_config(None, flags)


def _selection(tmp_path, pool) -> Path:
    sel = tmp_path / "sel"
    sel.mkdir()
    manifest = {
        "pools": [
            {"name": "a", "file": "a.jsonl", "format": "prompt_response"},
            {"name": "b", "file": "b.jsonl", "format": "prompt_response"},
        ]
    }
    (sel / "manifest.json").write_text(json.dumps(manifest))
    (sel / "a.jsonl").write_text(pool.read_text())  # b.jsonl is missing
    return sel


def _cases(tmp_path, base, pool):
    from davir_jax.jobs.dpo import dpo
    from davir_jax.jobs.evaluate import run_eval
    from davir_jax.jobs.pipeline import run_pipeline
    from davir_jax.jobs.score import score
    from davir_jax.jobs.sft import sft

    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = tmp_path / "missing.jsonl"
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [{"prompt": "hello", "chosen": "i am fine", "rejected": "world"}] * 4,
    )
    out = tmp_path / "out"
    pipe = {"out": out}
    return [
        (score, {"scoring": {"base": base, "reference": missing, "out": out}}, "scoring.reference"),
        (score, {"scoring": {"reference": base, "out": afile / "o"}}, "scoring.out"),
        (
            score,
            {"scoring": {"reference": base, "out": out}, "data": {"path": missing}},
            "data.path",
        ),
        (sft, {"train": {"out": out, "selection": _selection(tmp_path, pool)}}, "pool 'b'"),
        (sft, {"train": {"out": out}, "data": {"cache_dir": afile}}, "data.cache_dir"),
        (sft, {"train": {"out": out, "val": missing}}, "train.val"),
        (dpo, {"train": {"out": out}, "dpo": {"reference_scores": missing}}, "reference_scores"),
        (dpo, {"train": {"out": out}, "dpo": {"reference": missing}}, "dpo.reference"),
        (run_eval, {"data": {"path": missing}}, "data.path"),
        (run_eval, {"eval": {"out": afile}}, "eval.out"),
        (run_pipeline, {"pipeline": {**pipe, "test": missing}}, "pipeline.test"),
        (run_pipeline, {"pipeline": {**pipe, "val": missing}}, "pipeline.val"),
        (run_pipeline, {"pipeline": {**pipe, "extra_pools": f"[g={missing}]"}}, "extra_pools"),
        (run_pipeline, {"pipeline": pipe, "model": {"source": missing}}, "model.source"),
    ], pairs


def test_every_job_checks_all_inputs_and_outputs_first(tmp_path, base, pool, no_work):
    """One bad input or output per case, everything else good: the job stops with an error
    naming the key (and the path) before tokenizing anything."""
    cases, pairs = _cases(tmp_path, base, pool)
    for fn, sections, key in cases:
        data = {"path": pairs if fn.__name__ == "dpo" else pool, **sections.pop("data", {})}
        model = {"source": base, **sections.pop("model", {})}
        cfg = _cfg(tmp_path, data=data, model=model, **sections)
        with pytest.raises(ValueError, match=key) as e:
            fn(cfg, progress=False)
        assert "started work" not in str(e.value)
    assert not (tmp_path / "out" / "run.json").exists()


def test_pipeline_with_a_missing_test_file_fails_before_training(tmp_path, base, pool, capsys):
    missing = tmp_path / "missing.jsonl"
    out = tmp_path / "run"
    t0 = time.time()
    argv = ["pipeline", "--out", str(out), "--data", str(pool), "--test", str(missing), "-q"]
    assert main(argv + [f"--model.source={base}", f"--data.cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert err == f"davir pipeline: error: pipeline.test: {missing}: no such file or directory\n"
    assert not (out / "reference").exists() and time.time() - t0 < 30


# -- 3. a data set of which every row is skipped -----------------------------------------------


def test_every_row_skipped_is_one_error_with_the_reasons(tmp_path, base, capsys):
    """Rows that read but do not fit (too_long, found only when tokenizing: the error comes
    from `dataset.prepare`) and rows that do not read (found by the preflight): both name the
    file, the reasons, their counts and first locations, even with -q."""
    long = _write(tmp_path / "long.jsonl", ROWS)
    bad = _write(
        tmp_path / "bad.jsonl", [{"prompt": "hello", "response": ""}] * 3 + [{"prompt": "x"}]
    )
    cache = f"--data.cache_dir={tmp_path / 'cache'}"
    common = ["--model", str(base), cache, "-q"]
    assert main(["eval", "--data", str(long), "--max-len", "4", *common]) == 2
    err = capsys.readouterr().err
    assert f"{long}: every row was skipped (6 rows)" in err and "too_long x6" in err
    assert f"{long}:1" in err and err.count("\n") == 1 and err.startswith("davir eval: error:")
    assert main(["eval", "--data", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: every row was skipped (4 rows)" in err
    assert "empty_response x3" in err and "missing_field x1" in err and f"{bad}:4" in err
    score = _score_args(base, long, tmp_path / "s", tmp_path / "cache")
    assert main(score + ["--data.max_len=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("davir score: error: ") and "too_long x6" in err
    assert not (tmp_path / "eval.json").exists()


def test_prepare_raises_for_an_empty_data_set(tmp_path):
    from toy_tokenizers import word_tokenizer

    from davir_jax.data.config import DataConfig
    from davir_jax.data.dataset import prepare
    from davir_jax.data.skips import DataError

    long = _write(tmp_path / "long.jsonl", ROWS)
    cfg = DataConfig(path=str(long), max_len=4, cache_dir=str(tmp_path / "c"))
    for _ in range(2):  # built, then read back from the cache: the same error
        with pytest.raises(DataError, match=r"long\.jsonl: every row was skipped .*too_long x6"):
            prepare(cfg, word_tokenizer(True), progress=False)


# -- strict JSON -------------------------------------------------------------------------------


def test_write_json_is_strict_and_atomic(tmp_path):
    from davir_jax.core.io import dumps_json, write_json

    obj = {
        "nan": float("nan"),
        "inf": [float("inf"), -math.inf, 1.5],
        "np": np.float32("nan"),
        "arr": np.array([1.0, np.nan]),
        "i": np.int64(3),
        "ok": (1, "a", None, True),
    }
    write_json(tmp_path / "x.json", obj)
    got = _strict((tmp_path / "x.json").read_text())
    assert got == {
        "nan": None,
        "inf": [None, None, 1.5],
        "np": None,
        "arr": [1.0, None],
        "i": 3,
        "ok": [1, "a", None, True],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left
    assert _strict(dumps_json({"a": float("nan")})) == {"a": None}


def test_no_json_file_is_written_without_the_strict_helper():
    """No `json.dump(obj, file)` and no `json.dumps` inside a write call anywhere in the
    package: JSON files go through `core.io.write_json` / `dumps_json` (json.dumps stays for
    hashes, keys and messages)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "davir_jax"
    writers = {"write_atomic", "write_text", "write_bytes", "write"}

    def name(call: ast.Call) -> str:
        f = call.func
        return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")

    def is_json(call: ast.AST, fn: str) -> bool:
        return (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == fn
            and getattr(call.func.value, "id", "") == "json"
        )

    bad = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if is_json(node, "dump"):
                bad.append(f"{f.name}:{node.lineno} json.dump")
            if isinstance(node, ast.Call) and name(node) in writers:
                for sub in ast.walk(node):
                    if is_json(sub, "dumps"):
                        bad.append(f"{f.name}:{node.lineno} {name(node)}(json.dumps(...))")
    assert not bad


def test_eval_and_data_manifests_are_strict_json(tmp_path, base, pool, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(base), "--data", str(pool), "--out", str(out), "-q"]
    assert main(args + [f"--data.cache_dir={tmp_path / 'cache'}"]) == 0
    res = _strict((out / "eval.json").read_text())
    assert res["n_examples"] == 6 and math.isfinite(res["loss"])
    manifests = list((tmp_path / "cache").rglob("*.json"))
    assert manifests
    for m in manifests:
        _strict(m.read_text())


# -- 4. the run-directory lock -----------------------------------------------------------------


def test_a_second_process_into_a_locked_run_dir_refuses_at_once(tmp_path, base, pool):
    """Another process (this test) holds OUT's lock: `davir score` into OUT stops with exit 2,
    naming the directory and the holder, and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".davir.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder = {"pid": 4242, "host": "elsewhere", "started": "then", "what": "w", "command": "c"}
    os.write(fd, json.dumps(holder).encode())
    try:
        proc = run_cli("score", _score_args(base, pool, out, tmp_path / "cache")[1:])
        rc = proc.wait(timeout=300)
        text = proc.stdout.read().decode()
    finally:
        os.close(fd)
    assert rc == 2, text
    assert f"davir score: error: {out} is in use by another davir process (pid 4242 on " in text
    assert "Traceback" not in text
    assert sorted(p.name for p in out.iterdir()) == [".davir.lock"]
    assert not list((tmp_path / "cache").rglob("*"))  # refused before tokenizing


def test_two_processes_into_one_run_dir(tmp_path, base, pool):
    """Two real `davir score` processes started into one --out: one does the work, the other
    refuses naming the first (its pid and host)."""
    out = tmp_path / "out"
    args = _score_args(base, pool, out, tmp_path / "cache")[1:]
    procs = [run_cli("score", args) for _ in range(2)]
    rcs = [p.wait(timeout=600) for p in procs]
    texts = [p.stdout.read().decode() for p in procs]
    assert sorted(rcs) == [0, 2], texts
    winner, loser = (0, 1) if rcs[0] == 0 else (1, 0)
    assert f"{out} is in use by another davir process (pid {procs[winner].pid} on " in texts[loser]
    assert socket.gethostname() in texts[loser]
    assert (out / "scores.parquet").is_file()


def test_lock_is_reentrant_released_and_ignored_by_claim(tmp_path):
    from davir_jax.core.runs import (
        LOCK_FILE,
        RunLockedError,
        claim_run_dir,
        holds_lock,
        lock_run_dir,
        locked_run_dir,
    )

    out = tmp_path / "run"
    with locked_run_dir(out, "test"):
        with locked_run_dir(out, "nested"):  # the same process: re-entrant
            claim_run_dir(out, {"a": 1}, False, "test run")  # the lock file is not "contents"
        assert holds_lock(out)
        # Another open file description (as another process would have) is refused.
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        (out / "junk").write_text("x")
        claim_run_dir(out, {"a": 2}, True, "test run")  # overwrite keeps the held lock file
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "run.json"]
    assert not holds_lock(out)
    fd = os.open(out / LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: free for anyone
    try:
        with pytest.raises(RunLockedError, match=f"{out} is in use by another davir process"):
            lock_run_dir(out)
    finally:
        os.close(fd)
