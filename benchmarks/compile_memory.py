"""Compile time and peak memory of the project's jitted steps (scoring, SFT, DPO) by row length.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compile_memory.py [--models tiny,smollm2]
        [--rows 512,1024,2048,4096] [--jobs score,sft,dpo] [--batch-rows N] [--timeout 600]
        [--override model.attn_block=0 ...] [--append-results]

Models: `tiny` is the 2-layer random Llama of `configs/tiny.yaml`; `smollm2` is SmolLM2-135M
(`model.source=smollm2-135m`, the real weights). Steps: `davir_jax.jobs.score.nll_step` (one
model's scoring step), `davir_jax.jobs.sft.make_train_step` with `sft_objective` (forward, backward,
AdamW) and with `dpo.config_objective` (DPO, `dpo.objective`; reference log-probs fed
in the batch unless `dpo.reference_in_step=true`). The config is built as the CLI builds it
(`load_config` with dotted overrides, `mesh_from_config`), so `--override` reaches every key
(`model.remat=true`, `model.attn_block=0`, `mesh.cpu_devices=-1`, ...); a key this version does
not know is reported for the cell, not fatal to the table.

Each cell (model, job, row length) runs in a fresh subprocess, so its peak RSS (VmHWM) is its
own: `--batch-rows` rows of `row` tokens, packed as `davir_jax.data.batching.assemble` packs real
data (several examples per row, lengths drawn at random between row/8 and row/3, ~40% prompt and
~60% response tokens, the response masked in; DPO rows hold (chosen, rejected) pairs sharing a
prompt). Recorded: the first step (trace + XLA compile, then the first run; AOT
`lower().compile()`, which is what the first call of a jitted step does), the steady step (median
of `--steps` more runs), the peak RSS of the process (weights and optimizer state included) and
its RSS just before compiling, and XLA's own memory analysis of the compiled step (temporary
buffers, arguments). A cell over `--timeout` seconds is killed and recorded as "> T s" with the
peak RSS seen so far (sampled by the parent from /proc/PID/status).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "tiny": (str(ROOT / "configs" / "tiny.yaml"), []),
    "smollm2": (None, ["model.source=smollm2-135m"]),
}
JOBS = ("score", "sft", "dpo")
MIB = 2**20


# -- one cell, in its own process ----------------------------------------------------------------


def _proc_kib(key: str, path: str = "/proc/self/status") -> int | None:
    """A `Key: N kB` line of a /proc file (VmHWM of a status, MemTotal of meminfo), in KiB;
    None where unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM, else getrusage's maxrss)."""
    kib = _proc_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def _emit(**kw: Any) -> None:
    """One progress record on stdout: the parent keeps the last of each key if the cell dies."""
    print(json.dumps(kw), flush=True)


def synthetic_rows(
    row_len: int, batch_rows: int, max_segments: int, vocab: int, pairs: bool, seed: int = 0
) -> tuple[tuple[tuple[int, ...], ...], list[tuple[Any, Any]]]:
    """Rows of example indices and the examples `(input_ids, loss_mask)` that fill them, packed
    like real data; with `pairs`, consecutive (chosen, rejected) examples with one prompt."""
    import numpy as np

    rng = np.random.default_rng(seed)
    examples: list[tuple[Any, Any]] = []
    rows = []
    for _ in range(batch_rows):
        row: list[int] = []
        free = row_len
        while len(row) + (2 if pairs else 1) <= max_segments:
            n = int(rng.integers(max(row_len // 8, 2), max(row_len // 3, 3) + 1))
            if (2 * n if pairs else n) > free:
                break
            prompt = rng.integers(3, vocab, max(int(n * 0.4), 1))
            for _side in range(2 if pairs else 1):
                resp = rng.integers(3, vocab, n - len(prompt))
                ids = np.concatenate([prompt, resp]).astype(np.int32)
                mask = (np.arange(n) >= len(prompt)).astype(np.int32)
                row.append(len(examples))
                examples.append((ids, mask))
                free -= n
        rows.append(tuple(row))
    return tuple(rows), examples


def build_step(cfg: Any, job: str, mesh: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(jitted step, its arguments, facts) for one job, with the project's own loaders/steps."""
    import jax
    import numpy as np
    from flax import nnx

    from davir_jax.core.sharding import state_shardings
    from davir_jax.data.batching import BatchPlan, assemble
    from davir_jax.engine.nll import device_batch, nll_step
    from davir_jax.engine.trainer import (
        accum_batch_sharding,
        make_optimizer,
        make_train_step,
        optimizer_shardings,
        sft_objective,
        step_batch,
    )
    from davir_jax.jobs.dpo import PAIR_KEYS, config_objective
    from davir_jax.models import load_model, random_model

    m, dc = cfg.model, cfg.data

    def new_model() -> Any:  # as `davir` builds it: a source's weights, or a random `arch`
        if m.source is not None:
            return load_model(m.source, m.dtype, mesh, **m.run_options())
        return random_model(m.arch, m.dtype, mesh, seed=cfg.seed, **m.run_options())

    t0 = time.perf_counter()
    model = new_model()
    jax.block_until_ready(nnx.state(model))
    facts: dict[str, Any] = {"load_s": time.perf_counter() - t0, "params": model.arch.num_params()}
    row_len, n_rows = dc.packed_row_len, dc.batch_rows
    pairs = job == "dpo"
    # DPO plans pairs: max_segments counts pairs, the step reads 2 segments per pair.
    segments = 2 * max(dc.max_segments // 2, 1) if pairs else dc.max_segments
    rows, examples = synthetic_rows(
        row_len, n_rows, segments, model.arch.vocab_size, pairs, cfg.seed
    )
    get = lambda idx: [examples[i] for i in idx]  # noqa: E731
    facts["examples_per_row"] = sum(len(r) for r in rows) / len(rows)
    facts["real_tokens"] = sum(len(x) for x, _ in examples) / (row_len * n_rows)
    graphdef, params = nnx.split(model)
    if job == "score":
        fn = nll_step(model.arch, model.run, segments, cfg.scoring.chunk)
        batch = assemble(rows, row_len, segments, get)
        return fn, (params, *device_batch(batch, mesh)), facts

    accum = cfg.train.grad_accum
    plans = [BatchPlan(row_len, rows)] * accum
    tx = make_optimizer(cfg.optimizer, 1000)
    psh = state_shardings(params, mesh)
    osh = optimizer_shardings(tx, params, psh, mesh)
    state = (params, jax.jit(tx.init, out_shardings=osh)(params))
    frozen, extra = None, ()
    if job == "sft":
        objective = sft_objective(cfg.train.chunk)
        batch = step_batch(SimpleNamespace(num_segments=segments, get=get), plans, mesh, 0, 1)
    else:
        d = cfg.dpo
        objective = config_objective(d, cfg.train.chunk)
        bs = [assemble(p.rows, row_len, segments, get) for p in plans]
        host = {k: np.stack([getattr(b, k) for b in bs]) for k in PAIR_KEYS[:-1]}
        # Reference NLLs of a plausible size (summed over each response), as precomputed.
        n_resp = np.array([int(mk.sum()) for _, mk in examples] + [0], np.float32)
        # (example_index -1, an empty segment, reads the appended 0.)
        host["ref_nll"] = np.stack(
            [n_resp[b.example_index] * np.log(model.arch.vocab_size) for b in bs]
        ).astype(np.float32)
        sh = accum_batch_sharding(mesh)
        batch = {k: jax.make_array_from_process_local_data(sh, v) for k, v in host.items()}
        if d.reference_in_step:
            ref_def, ref_params = nnx.split(new_model())
            frozen, extra = (ref_def, state_shardings(ref_params, mesh)), (ref_params,)
            batch.pop("ref_nll")
    fn = make_train_step(graphdef, tx, objective, (psh, osh), mesh, frozen)
    return fn, (state, batch, *extra), facts


def run_cell(model: str, job: str, row_len: int, args: argparse.Namespace) -> None:
    """Measure one cell and print its records (JSON lines) on stdout."""
    from davir_jax.config import load_config
    from davir_jax.core.schema import ConfigError

    path, base = MODELS[model]
    over = base + [f"data.max_len={row_len}", f"data.row_len={row_len}"]
    if args.batch_rows:
        over.append(f"data.batch_rows={args.batch_rows}")
    try:
        cfg = load_config(path, over + list(args.override))
    except ConfigError as e:
        _emit(error=f"config: {e}")
        return
    import jax

    from davir_jax.core.sharding import mesh_from_config

    mesh = mesh_from_config(cfg.mesh)
    fn, fn_args, facts = build_step(cfg, job, mesh)
    jax.block_until_ready(fn_args)
    _emit(**facts, rows=cfg.data.batch_rows, devices=jax.device_count(), rss_before=_peak_rss())
    t0 = time.perf_counter()
    compiled = fn.lower(*fn_args).compile()
    compile_s = time.perf_counter() - t0
    mem: dict[str, Any] = {}
    try:
        ma = compiled.memory_analysis()
        mem = {"xla_temp": ma.temp_size_in_bytes, "xla_args": ma.argument_size_in_bytes}
    except Exception as e:  # not every backend/version reports it
        mem = {"xla_note": f"no memory analysis ({type(e).__name__})"}
    _emit(compile_s=compile_s, **mem)

    def once(a: tuple[Any, ...]) -> tuple[tuple[Any, ...], float]:
        t = time.perf_counter()
        out = compiled(*a)
        jax.block_until_ready(out)
        # A train step donates its state: the next step runs on the state it returned.
        return (a if job == "score" else (out[0], *a[1:])), time.perf_counter() - t

    fn_args, first_run = once(fn_args)
    _emit(first_s=compile_s + first_run, first_run_s=first_run, rss_peak=_peak_rss())
    times = []
    for _ in range(args.steps):
        fn_args, dt = once(fn_args)
        times.append(dt)
    times.sort()
    _emit(steady_s=times[len(times) // 2] if times else None, rss_peak=_peak_rss(), done=True)


# -- the table, from the parent process --------------------------------------------------------


def measure(model: str, job: str, row_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one cell in a fresh process under the timeout; its merged records."""
    cmd = [
        sys.executable,
        __file__,
        "--cell",
        f"{model},{job},{row_len}",
        "--steps",
        str(args.steps),
    ]
    if args.batch_rows:
        cmd += ["--batch-rows", str(args.batch_rows)]
    for o in args.override:
        cmd += ["--override", o]
    rec: dict[str, Any] = {"model": model, "job": job, "row_len": row_len}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, text=True)
        seen = 0  # KiB: the child's VmHWM as last sampled, for a cell killed at the timeout
        while proc.poll() is None:
            seen = max(seen, _proc_kib("VmHWM", f"/proc/{proc.pid}/status") or 0)
            if time.perf_counter() - t0 > args.timeout:
                proc.kill()
                proc.wait()
                rec["timeout"] = True
                break
            time.sleep(0.2)
        rec["wall_s"] = time.perf_counter() - t0
        out.seek(0)
        for line in out:
            if line.startswith("{"):
                rec.update(json.loads(line))
        if seen and seen * 1024 > rec.get("rss_peak", 0):
            rec["rss_peak"] = seen * 1024
        if not rec.get("done") and "timeout" not in rec and "error" not in rec:
            err.seek(0)
            tail = [x for x in err.read().strip().splitlines() if x.strip()]
            rec["error"] = f"exit {proc.returncode}: " + (tail[-1] if tail else "no output")
    return rec


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:,.{1 if b < 10 * MIB else 0}f} MiB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table(records: list[dict[str, Any]], timeout: float) -> str:
    lines = [
        "| model | job | row tokens | batch | first step s (compile + run) | compile s | "
        "steady step s | peak RSS | peak RSS before compile | XLA temp | XLA arguments | notes |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in records:
        first = (
            f"> {timeout:.0f} s"
            if r.get("timeout") and "first_s" not in r
            else _s(r.get("first_s"))
        )
        steady = f"> {timeout:.0f} s" if r.get("timeout") else _s(r.get("steady_s"))
        notes = [r["error"]] if "error" in r else []
        if r.get("timeout"):
            notes.append(f"killed at {timeout:.0f} s; peak RSS as seen until then")
        if "examples_per_row" in r:
            notes.append(f"{r['examples_per_row']:.1f} ex/row, {r['real_tokens']:.0%} real tokens")
        if "xla_note" in r:
            notes.append(r["xla_note"])
        batch = f"{r['rows']}x{r['row_len']}" if "rows" in r else "-"
        lines.append(
            f"| {r['model']} | {r['job']} | {r['row_len']} | {batch} | {first} | "
            f"{_s(r.get('compile_s'))} | {steady} | {_mib(r.get('rss_peak'))} | "
            f"{_mib(r.get('rss_before'))} | {_mib(r.get('xla_temp'))} | "
            f"{_mib(r.get('xla_args'))} | {'; '.join(notes).replace('|', '/')} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    """CPU, cores, RAM, jax (scoring_throughput.machine) and the machine's total memory."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scoring_throughput import machine

    info = machine()
    ram = _proc_kib("MemTotal", "/proc/meminfo")
    return info + (f"; {ram / 2**20:.0f} GiB RAM" if ram else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--rows", default="512,1024,2048,4096", help="row lengths in tokens")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"of {', '.join(JOBS)}")
    ap.add_argument("--batch-rows", type=int, default=0, help="rows per batch (0: data.batch_rows)")
    ap.add_argument("--steps", type=int, default=3, help="steady steps timed (median)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key for every cell, e.g. model.remat=true (repeatable)",
    )
    ap.add_argument("--append-results", action="store_true", help="append to RESULTS.md")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        model, job, row_len = args.cell.split(",")
        run_cell(model, job, int(row_len), args)
        return
    models = [x for x in args.models.split(",") if x]
    jobs = [x for x in args.jobs.split(",") if x]
    rows = [int(x) for x in args.rows.split(",") if x]
    bad = [x for x in models if x not in MODELS] + [x for x in jobs if x not in JOBS]
    if bad:
        sys.exit(f"unknown model or job: {', '.join(bad)} (models {list(MODELS)}, jobs {JOBS})")
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compile_memory.py " + " ".join(sys.argv[1:])
    info = machine_line()
    print(info, flush=True)
    records = []
    t_start = time.perf_counter()
    for model in models:
        for job in jobs:
            for row_len in rows:
                r = measure(model, job, row_len, args)
                records.append(r)
                print(table([r], args.timeout).splitlines()[-1], flush=True)
    total = time.perf_counter() - t_start
    section = [
        f"## Compile time and peak memory by row length (`benchmarks/compile_memory.py`, "
        f"{datetime.date.today().isoformat()})",
        "",
        f"Command: `{cmd.strip()}` ({total / 60:.1f} min).",
        f"Machine: {info}.",
        "Each cell in a fresh process: synthetic packed rows (several examples per row, response "
        "tokens masked in); first step = trace + XLA compile + first run; steady = median of "
        f"{args.steps} more steps; peak RSS = the process's VmHWM (weights, optimizer state and "
        "batch included); peak RSS before compile = its VmHWM once the model, state and batch "
        "were built; XLA temp/arguments = the compiled step's memory analysis.",
        "",
        table(records, args.timeout),
    ]
    from scoring_throughput import publish

    publish(section, args.append_results)


if __name__ == "__main__":
    main()
