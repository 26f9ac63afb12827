"""Scoring throughput against Hugging Face transformers + PyTorch, same model, same token ids.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scoring_throughput.py [--models tiny,smollm2]
        [--sets gsm8k,alpaca] [--append-results]

For each model (a tiny random Llama with SmolLM2's 49,152-token vocabulary, and the real
SmolLM2-135M) torch gets the same weights through `export_hf`. For each data set (the first rows
of GSM8K test and of alpaca-libre tasks_v1, `plain` template) every method computes every
example's summed response NLL from the same token ids and masks (`data.get`):

* ours, packed: `batch_nll` on packed rows (`--row-len` x `--batch-rows`), after a warm-up that
  compiles every batch shape once, on one JAX device per core (`--cpu-devices`, as
  `configs/mesh/cpu.yaml`) with the batch split over them;
* ours, packed, 1 device: the same on a single device (when there are several), in the same run;
* ours, bucketed: the same on length-bucketed padded batches (`pack=False`, `--pad-rows` rows);
* HF loop: one example at a time, logits -> cross-entropy at the response positions -> sum;
* HF padded-16: batches of 16 in file order, right padding to the batch maximum + attention_mask;
* HF padded-16, length-sorted: the same after sorting the examples by length (a stronger baseline);
* ours, packed, attention removed (`--bound`): the packed pass again with attention replaced by a
  no-op (its NLLs are meaningless), an upper bound that no attention implementation can beat:
  the rest of the step alone (query/output projections, MLP, LM head; the key/value projections,
  which only attention reads, drop out with it).

Throughput = real (non-pad) tokens of all examples / wall time of the pass (host batch assembly
included). Compilations are counted with `jax.monitoring` (backend compile events) and the jitted
step's cache size, before and after the timed pass. The per-example NLLs of all methods are
compared (max relative difference against the HF loop).

Peak memory (`--memory`): for SmolLM2 and a `[rows, seq]` batch, XLA's compiled memory analysis
of the scoring step (temp buffers, arguments, outputs) and the measured RSS growth while the step
runs (a sampler thread, in a fresh subprocess per chunk setting), at the default LM-head chunk
and at chunk = seq, against the `rows * seq * vocab * 4` bytes of full float32 logits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.monitoring  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from davir_jax.config import ModelConfig  # noqa: E402
from davir_jax.core.losses import LM_HEAD_CHUNK  # noqa: E402
from davir_jax.core.sharding import make_mesh, use_cpu_devices  # noqa: E402
from davir_jax.data import batching  # noqa: E402
from davir_jax.data.config import DataConfig  # noqa: E402
from davir_jax.data.dataset import TokenizedData, prepare  # noqa: E402
from davir_jax.engine.nll import (  # noqa: E402
    _nll_step,
    batch_nll,
    device_batch,
    nll_step,
    stream_nll,
)
from davir_jax.models import ArchConfig, export_hf, load_model, load_tokenizer, random_model  # noqa: E402
from davir_jax.models.decoder import Decoder  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SETS = {
    "gsm8k": SHARED / "gsm8k" / "test.jsonl",
    "alpaca": SHARED / "alpaca-libre" / "tasks_v1.jsonl",
}
# Examples per data set and model: enough for several full packed batches, so that the last,
# partly filled batch weighs little (as in a real scoring job), within ~20 minutes on 2 CPU cores.
DEFAULT_N = {
    ("tiny", "gsm8k"): 192,
    ("tiny", "alpaca"): 512,
    ("smollm2", "gsm8k"): 192,
    ("smollm2", "alpaca"): 512,
}
TINY = ArchConfig(
    family="llama",
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=768,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
)

# Backend compilations in this process, from jax.monitoring (one event per XLA compile).
_COMPILES = [0]


def _on_event(event: str, duration: float, **kwargs: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat), or NaN where unreadable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Cores used by this process, and by everything else on the machine, over a timed span:
    another job on a 2-core box would silently skew a throughput comparison."""

    def __enter__(self) -> CpuMeter:
        self.t0, self.own0, self.busy0 = time.perf_counter(), _own_s(), _busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        own = _own_s() - self.own0
        self.own = own / self.seconds
        self.other = max((_busy_s() - self.busy0 - own) / self.seconds, 0.0)


def wait_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (at most `max_wait` s) until the rest of the machine is idle; other sessions share
    this box, unseen by `ps`. Returns the cores others used in the last 0.5 s probe."""
    t0 = time.perf_counter()
    while True:
        b0, s0 = _busy_s(), _own_s()
        time.sleep(0.5)
        other = max((_busy_s() - b0 - (_own_s() - s0)) / 0.5, 0.0)
        if not other > threshold or time.perf_counter() - t0 > max_wait:
            return other
        time.sleep(2.0)


def _own_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass
class Result:
    """One method's pass over one data set."""

    method: str
    seconds: float
    tokens: int
    nll: np.ndarray
    note: str = ""
    cores: float = float("nan")
    other: float = float("nan")
    tries: int = 1
    bound: bool = False  # not a method: NLLs are not compared
    compiles_warmup: int | None = None
    compiles_timed: int | None = None
    cache_before: int | None = None
    cache_after: int | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


# -- ours --------------------------------------------------------------------------------------


def score_ours(model: Decoder, data: TokenizedData, chunk: int, method: str) -> Result:
    """Warm up on one batch of every distinct shape, then time a full pass."""
    plans = data.plans()
    fn = nll_step(model.arch, model.run, data.num_segments, chunk)
    first_of_width: dict[int, batching.BatchPlan] = {}
    for p in plans:
        first_of_width.setdefault(p.width, p)
    c0 = _COMPILES[0]
    for _, batch in data.batches(list(first_of_width.values())):
        batch_nll(model, batch, data.num_segments, chunk)
    warm = _COMPILES[0] - c0
    cache_before = fn._cache_size()
    nll = np.full(len(data), np.nan)
    c0 = _COMPILES[0]
    with CpuMeter() as cpu:
        # As `davir score` runs: the next batch is dispatched before this one is read back.
        batches = (b for _, b in data.batches(plans))
        for batch, out in stream_nll({"ours": model}, batches, data.num_segments, chunk):
            n, _ = out["ours"]
            sel = batch.example_index >= 0
            nll[batch.example_index[sel]] = n[sel]
    eff = batching.plan_efficiency(plans, data.lengths)
    shapes = sorted({(len(p.rows), p.width) for p in plans})
    note = f"{len(plans)} batches, shapes {', '.join(f'{r}x{w}' for r, w in shapes)}; "
    note += f"{eff:.0%} real tokens"
    return Result(
        method,
        cpu.seconds,
        int(data.lengths.sum()),
        nll,
        note,
        cores=cpu.own,
        other=cpu.other,
        compiles_warmup=warm,
        compiles_timed=_COMPILES[0] - c0,
        cache_before=cache_before,
        cache_after=fn._cache_size(),
    )


@contextlib.contextmanager
def attention_removed() -> Any:
    """Attention as a no-op (its output = the queries) while traced inside: what the step costs
    without it. Only for the `--bound` row; its NLLs are meaningless."""
    from davir_jax.models import decoder

    saved = decoder.blocked_attention, decoder.dense_attention
    decoder.blocked_attention = decoder.dense_attention = lambda q, *a, **kw: q
    _nll_step.cache_clear()  # traced anew with the no-op, and again after
    try:
        yield
    finally:
        decoder.blocked_attention, decoder.dense_attention = saved
        _nll_step.cache_clear()


def score_without_attention(model: Decoder, data: TokenizedData, chunk: int) -> Result:
    with attention_removed():
        r = score_ours(model, data, chunk, "ours, packed, attention removed (bound)")
    r.note = "upper bound: attention replaced by a no-op, NLLs meaningless; " + r.note
    r.bound = True
    return r


# -- Hugging Face + PyTorch ----------------------------------------------------------------------


def load_torch(hf_dir: Path) -> Any:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval()


def hf_loop(model: Any, data: TokenizedData, warmup: int = 3) -> Result:
    """One example per forward: logits -> cross-entropy at the response positions -> sum."""
    import torch
    import torch.nn.functional as F

    def one(i: int) -> float:
        x, m = data.get([i])[0]
        ids = torch.from_numpy(x.astype(np.int64))[None]
        logits = model(input_ids=ids).logits[0, :-1]
        sel = torch.from_numpy(m[1:] > 0)
        return float(F.cross_entropy(logits[sel].float(), ids[0, 1:][sel], reduction="sum"))

    nll = np.zeros(len(data))
    with torch.inference_mode():
        for i in range(min(warmup, len(data))):
            one(i)
        with CpuMeter() as cpu:
            for i in range(len(data)):
                nll[i] = one(i)
    tokens = int(data.lengths.sum())
    return Result("HF loop (1 example)", cpu.seconds, tokens, nll, cores=cpu.own, other=cpu.other)


def hf_padded(model: Any, data: TokenizedData, rows: int = 16, sort: bool = False) -> Result:
    """Batches of `rows` (file order, or sorted by length), right-padded to the batch maximum."""
    import torch
    import torch.nn.functional as F

    order = np.argsort(data.lengths, kind="stable") if sort else np.arange(len(data))
    groups = [order[i : i + rows].tolist() for i in range(0, len(order), rows)]

    def one(idx: list[int]) -> np.ndarray:
        ex = data.get(idx)
        width = max(len(x) for x, _ in ex)
        ids = np.zeros((len(ex), width), np.int64)
        attn = np.zeros((len(ex), width), np.int64)
        loss = np.zeros((len(ex), width), bool)
        for r, (x, m) in enumerate(ex):
            ids[r, : len(x)], attn[r, : len(x)], loss[r, : len(x)] = x, 1, m > 0
        tid, tattn = torch.from_numpy(ids), torch.from_numpy(attn)
        logits = model(input_ids=tid, attention_mask=tattn).logits[:, :-1]
        sel = torch.from_numpy(loss[:, 1:])
        tok = F.cross_entropy(logits[sel].float(), tid[:, 1:][sel], reduction="none")
        row = torch.from_numpy(np.nonzero(loss[:, 1:])[0])
        return torch.zeros(len(ex), dtype=tok.dtype).index_add_(0, row, tok).numpy()

    nll = np.zeros(len(data))
    with torch.inference_mode():
        one(groups[0])  # warm-up
        with CpuMeter() as cpu:
            for g in groups:
                nll[g] = one(g)
    pad = sum(len(g) * int(data.lengths[g].max()) for g in groups)
    name = f"HF padded-{rows}" + (", length-sorted" if sort else "")
    note = f"{data.lengths.sum() / pad:.0%} real tokens"
    tokens = int(data.lengths.sum())
    return Result(name, cpu.seconds, tokens, nll, note, cores=cpu.own, other=cpu.other)


# -- memory --------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synthetic_batch(rows: int, seq: int, num_segments: int, vocab: int = 49152) -> batching.Batch:
    """A packed batch of random tokens: four examples of seq/4 tokens per row, all scored."""
    rng = np.random.default_rng(0)
    seg_len = seq // 4
    return batching.Batch(
        input_ids=rng.integers(3, vocab, (rows, seq)).astype(np.int32),
        segment_ids=np.repeat(np.arange(1, 5, dtype=np.int32), seg_len)[None].repeat(rows, 0),
        positions=np.tile(np.arange(seg_len, dtype=np.int32), 4)[None].repeat(rows, 0),
        loss_mask=np.ones((rows, seq), np.int32),
        example_index=np.zeros((rows, num_segments), np.int32),
        weights=np.zeros((rows, num_segments), np.float32),
    )


def breakdown(model: Decoder, rows: int, seq: int, chunk: int, iters: int = 2) -> dict[str, Any]:
    """Where a packed step's time goes: the full step, the transformer body alone (the rest is
    the chunked LM head + loss), and the body on 4x shorter rows (same tokens; attention is
    quadratic in the row length, everything else is not)."""
    graphdef, state = nnx.split(model)
    body = jax.jit(lambda st, i, sg, ps: nnx.merge(graphdef, st).hidden_states(i, sg, ps))
    full = nll_step(model.arch, model.run, 16, chunk)
    out: dict[str, Any] = {"shape": f"{rows}x{seq}"}
    cases = [
        ("full step", full, (rows, seq), 4),
        ("body only", body, (rows, seq), 3),
        (f"body only, {rows * 4}x{seq // 4} rows", body, (rows * 4, seq // 4), 3),
    ]
    for name, fn, (r, t), n_args in cases:
        arrays = device_batch(synthetic_batch(r, t, 16), model.run.sharder.mesh)[:n_args]
        jax.block_until_ready(fn(state, *arrays))
        wait_quiet(10.0)
        with CpuMeter() as cpu:
            for _ in range(iters):
                jax.block_until_ready(fn(state, *arrays))
        out[name] = (r * t * iters / cpu.seconds, cpu.own, cpu.other)
    return out


def memory_probe(rows: int, seq: int, chunk: int, num_segments: int = 16) -> dict[str, Any]:
    """XLA's memory analysis of SmolLM2's scoring step on `[rows, seq]` and the RSS growth of
    running it (sampled every millisecond)."""
    model = load_model("smollm2-135m", "float32", make_mesh(1, 1, 1))
    graphdef, state = nnx.split(model)
    arrays = device_batch(synthetic_batch(rows, seq, num_segments), model.run.sharder.mesh)
    fn = nll_step(model.arch, model.run, num_segments, chunk)
    t0 = time.perf_counter()
    compiled = fn.lower(state, *arrays).compile()
    t_compile = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    # The transformer body alone (no LM head): what the attention and MLP activations need.
    body = jax.jit(lambda st, i, sg, ps: nnx.merge(graphdef, st).hidden_states(i, sg, ps))
    body_temp = body.lower(state, *arrays[:3]).compile().memory_analysis().temp_size_in_bytes
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    before = _rss()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, *arrays))
    t_step = time.perf_counter() - t0
    stop.set()
    th.join()
    return {
        "rows": rows,
        "seq": seq,
        "chunk": chunk,
        "vocab": model.arch.vocab_size,
        "temp_bytes": ma.temp_size_in_bytes,
        "body_temp_bytes": body_temp,
        "argument_bytes": ma.argument_size_in_bytes,
        "output_bytes": ma.output_size_in_bytes,
        "rss_before": before,
        "rss_growth": max(peak[0] - before, 0),
        "compile_s": t_compile,
        "step_s": t_step,
    }


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def run_memory(rows: int, seq: int, chunks: list[int]) -> list[dict[str, Any]]:
    """One fresh subprocess per chunk setting, so RSS growth is not hidden by earlier peaks."""
    out = []
    for c in chunks:
        need = 2 * rows * min(c, seq) * 49152 * 4 + 3 * 2**30  # logits chunk x2, model, slack
        avail = _mem_available()
        if avail < need:
            print(f"  memory probe, chunk {c}: skipped, {avail / 2**30:.1f} GiB available")
            continue
        cmd = [sys.executable, __file__, "--memory-probe", f"{rows},{seq},{c}"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


# -- driver --------------------------------------------------------------------------------------


def subset(path: Path, n: int, out_dir: Path) -> Path:
    """The first `n` lines of a JSONL file (kept in its own format)."""
    dst = out_dir / f"{path.parent.name}-{path.stem}-first{n}.jsonl"
    with open(path) as src, open(dst, "w") as f:
        for i, line in enumerate(src):
            if i == n:
                break
            f.write(line)
    return dst


def prepare_set(
    path: Path, tok: Any, cache: str, args: argparse.Namespace, pack: bool
) -> TokenizedData:
    cfg = DataConfig(
        path=str(path),
        template="plain",
        max_len=args.max_len,
        cache_dir=cache,
        pack=pack,
        row_len=args.row_len if pack else None,
        max_segments=args.max_segments,
        batch_rows=args.batch_rows if pack else args.pad_rows,
        bucket_min=args.bucket_min,
    )
    return prepare(cfg, tok, progress=False)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))


def bench_model(
    name: str,
    model: Decoder,
    tok: Any,
    args: argparse.Namespace,
    work: Path,
    single: Decoder | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The throughput rows of one model over every data set, and its step-time breakdown;
    `single` is the same model on one device, timed as well when `model` spans several."""
    hf_dir = export_hf(model, None, work / f"hf-{name}")
    tm = load_torch(hf_dir)
    out = []
    for set_name in args.sets:
        n = args.n or DEFAULT_N[(name, set_name)]
        path = subset(SETS[set_name], n, work)
        cache = str(work / "cache")
        packed = prepare_set(path, tok, cache, args, pack=True)
        padded = prepare_set(path, tok, cache, args, pack=False)
        assert packed.example_ids == padded.example_ids
        results: list[Result] = []
        runs: list[tuple[Callable[..., Result], tuple[Any, ...]]] = [
            (hf_loop, (tm, packed)),
            (hf_padded, (tm, packed, 16)),
            (hf_padded, (tm, packed, 16, True)),
            (score_ours, (model, packed, args.chunk, "ours, packed")),
            (score_ours, (model, padded, args.chunk, "ours, bucketed")),
        ]
        if single is not None:
            runs.append((score_ours, (single, packed, args.chunk, "ours, packed, 1 device")))
        if args.bound:
            runs.append((score_without_attention, (model, packed, args.chunk)))
        for fn, fn_args in runs:
            wait_quiet(args.quiet_wait)
            r = fn(*fn_args)
            for _ in range(args.retries):
                if not r.other > args.busy:
                    break
                print(f"  (others used {r.other:.1f} cores during {r.method}: rerun)", flush=True)
                wait_quiet(args.quiet_wait)
                again, tries = fn(*fn_args), r.tries + 1
                r = again if again.seconds < r.seconds else r
                r.tries = tries
            results.append(r)
            print(
                f"  {name} {set_name} {r.method}: {r.tok_s:,.0f} tok/s ({r.seconds:.1f} s, "
                f"{r.cores:.1f} cores, others {r.other:.1f}) {r.note}",
                flush=True,
            )
        loop, pad16 = results[0], results[1]
        lens = packed.lengths
        resp = packed.n_response_tokens().sum() / lens.sum()
        for r in results:
            out.append(
                {
                    "model": name,
                    "data": f"{set_name} ({len(packed)} ex, {int(lens.sum()):,} tok, "
                    f"mean {lens.mean():.0f}, {resp:.0%} response)",
                    "method": r.method,
                    "tok_s": r.tok_s,
                    "seconds": r.seconds,
                    "vs_loop": r.tok_s / loop.tok_s,
                    "vs_pad16": r.tok_s / pad16.tok_s,
                    "rel_diff": None if r.bound else rel_diff(r.nll, loop.nll),
                    "compiles": None
                    if r.compiles_warmup is None
                    else f"{r.compiles_warmup} / {r.compiles_timed} "
                    f"(cache {r.cache_before}->{r.cache_after})",
                    "cores": f"{r.cores:.1f} / {r.other:.1f}",
                    "note": "; ".join(
                        x
                        for x in (
                            r.note,
                            f"best of {r.tries} passes" * (r.tries > 1),
                            "**DISTURBED by other processes: do not trust**"
                            * bool(r.other > args.busy),
                        )
                        if x
                    ),
                }
            )
    del tm
    print(f"  {name}: step breakdown on {args.batch_rows}x{args.row_len}", flush=True)
    return out, {"model": name, **breakdown(model, args.batch_rows, args.row_len, args.chunk)}


def throughput_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | data | method | real tok/s | s | vs HF loop | vs HF pad-16 | max rel diff "
        "vs HF loop | compiles warm-up / timed | cores used / by others | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['data']} | {r['method']} | {r['tok_s']:,.0f} | "
            f"{r['seconds']:.1f} | {r['vs_loop']:.2f}x | {r['vs_pad16']:.2f}x | "
            f"{'-' if r['rel_diff'] is None else format(r['rel_diff'], '.1e')} | "
            f"{r['compiles'] or '-'} | {r['cores']} | {r['note']} |"
        )
    return "\n".join(lines)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("model", "shape")]
    lines = [
        "| model | packed batch | " + " | ".join(f"{k}: tok/s (cores)" for k in keys) + " |",
        "| --- | --- |" + " ---: |" * len(keys),
    ]
    for b in rows:
        cells = " | ".join(f"{b[k][0]:,.0f} ({b[k][1]:.1f})" for k in keys)
        lines.append(f"| {b['model']} | {b['shape']} | {cells} |")
    return "\n".join(lines)


def memory_table(mem: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | LM-head chunk | full f32 logits | XLA temp (whole step) | temp / logits | "
        "temp of the body alone | arguments (weights + batch) | RSS growth while running | "
        "RSS growth / logits | step s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    mib = 2**20
    for m in mem:
        full = m["rows"] * m["seq"] * m["vocab"] * 4
        lines.append(
            f"| {m['rows']}x{m['seq']} | {m['chunk']} | {full / mib:,.0f} MiB | "
            f"{m['temp_bytes'] / mib:,.0f} MiB | {m['temp_bytes'] / full:.2f} | "
            f"{m['body_temp_bytes'] / mib:,.0f} MiB | "
            f"{m['argument_bytes'] / mib:,.0f} MiB | {m['rss_growth'] / mib:,.0f} MiB | "
            f"{m['rss_growth'] / full:.2f} | {m['step_s']:.1f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}, "
        f"{jax.device_count()} devices); torch {torch.__version__}, "
        f"torch.get_num_threads()={torch.get_num_threads()}"
    )


def gemm_peak(m: int = 4096, k: int = 576, n: int = 1536, reps: int = 5) -> dict[str, float]:
    """float32 matrix-product GFLOP/s of XLA (jax) and of torch on this machine, for one
    SmolLM2 MLP-sized product: the ceiling both sides' scoring runs against."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    out = {}
    f = jax.jit(lambda x, y: x @ y)
    ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
    f(ja, jb).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        f(ja, jb).block_until_ready()
    out["xla"] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.inference_mode():
        ta @ tb
        t0 = time.perf_counter()
        for _ in range(reps):
            ta @ tb
        out["torch"] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--sets", default="gsm8k,alpaca")
    ap.add_argument("--n", type=int, default=0, help="examples per set (0: per-model defaults)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--row-len", type=int, default=512)
    ap.add_argument("--batch-rows", type=int, default=8, help="packed rows per batch")
    ap.add_argument("--pad-rows", type=int, default=16, help="rows per bucketed padded batch")
    ap.add_argument("--bucket-min", type=int, default=64)
    ap.add_argument("--max-segments", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=LM_HEAD_CHUNK, help="LM-head chunk of ours")
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=-1,
        help="JAX CPU devices ours splits each batch over (-1: one per core; 1: one device)",
    )
    ap.add_argument(
        "--attn-block", type=int, default=ModelConfig().attn_block, help="0: dense attention"
    )
    ap.add_argument(
        "--bound",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time ours with attention removed (an upper bound for any attention kernel)",
    )
    ap.add_argument(
        "--busy",
        type=float,
        default=0.25,
        help="rerun a pass when other processes used more than this many cores during it",
    )
    ap.add_argument("--retries", type=int, default=3, help="reruns of a disturbed pass")
    ap.add_argument(
        "--quiet-wait", type=float, default=120.0, help="seconds to wait for an idle machine"
    )
    ap.add_argument("--memory", default="8x1024", help="RxT batch for the memory check; '' skips")
    ap.add_argument("--append-results", action="store_true", help="append to RESULTS.md")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:  # a fresh process on JAX's default single CPU device
        r, t, c = (int(v) for v in args.memory_probe.split(","))
        print(json.dumps(memory_probe(r, t, c)))
        return
    args.models = [m for m in args.models.split(",") if m and m != "none"]
    args.sets = [s for s in args.sets.split(",") if s]
    missing = [str(SETS[s]) for s in args.sets if not SETS[s].is_file()]
    if missing:
        print(f"skipped: the shared data is absent ({', '.join(missing)})")
        return
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scoring_throughput.py " + " ".join(
        sys.argv[1:]
    )
    use_cpu_devices(args.cpu_devices)  # before the first JAX computation
    info = machine()
    peak = gemm_peak()
    info += (
        f"; float32 GEMM 4096x576x1536: XLA {peak['xla']:.0f} GFLOP/s, "
        f"torch {peak['torch']:.0f} GFLOP/s"
    )
    print(info, flush=True)
    t_start = time.perf_counter()
    tok = load_tokenizer("smollm2-135m")
    n_dev = jax.device_count()
    for flag, n_rows in (("--batch-rows", args.batch_rows), ("--pad-rows", args.pad_rows)):
        if n_rows % n_dev:
            sys.exit(f"{flag}={n_rows} is not a multiple of the {n_dev} devices (--cpu-devices)")
    mesh = make_mesh(-1, 1, 1)  # data parallel over every (CPU) device
    one = make_mesh(1, 1, 1, jax.devices()[:1]) if jax.device_count() > 1 else None
    builders: dict[str, Callable[[Any], Decoder]] = {
        "tiny": lambda m: random_model(TINY, "float32", m, seed=0, attn_block=args.attn_block),
        "smollm2": lambda m: load_model("smollm2-135m", "float32", m, attn_block=args.attn_block),
    }
    rows: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"{name}:", flush=True)
            single = builders[name](one) if one is not None else None
            model_rows, part = bench_model(name, builders[name](mesh), tok, args, Path(tmp), single)
            rows += model_rows
            parts.append(part)
    mem: list[dict[str, Any]] = []
    if args.memory:
        r, t = (int(v) for v in args.memory.lower().split("x"))
        chunks = sorted({32, args.chunk, t})
        print(f"memory: SmolLM2 step on {r}x{t}, chunks {chunks}", flush=True)
        mem = run_memory(r, t, chunks)
    total = time.perf_counter() - t_start
    section = [
        f"## Scoring throughput vs HF transformers + PyTorch (`benchmarks/scoring_throughput.py`, "
        f"{datetime.date.today().isoformat()})",
        "",
        f"Command: `{cmd.strip()}` ({total / 60:.1f} min).",
        f"Machine: {info}.",
        f"Ours: float32 on {jax.device_count()} {jax.default_backend().upper()} device(s), each "
        "batch split over them (data parallel), "
        f"packed rows {args.row_len} x {args.batch_rows} per batch "
        f"(max {args.max_segments} examples/row) or length buckets from {args.bucket_min} "
        f"({args.pad_rows} rows), max_len {args.max_len}, LM-head chunk {args.chunk} "
        "(response positions only), attention "
        + (f"in {args.attn_block}-token blocks. " if args.attn_block else "dense. ")
        + "HF: float32, sdpa attention, inference_mode. Same token ids and masks on both sides; "
        "tok/s = real (non-pad) tokens / wall time of the pass after warm-up.",
    ]
    if rows:
        section += ["", throughput_table(rows)]
    if parts:
        section += [
            "",
            "Where ours spends a packed step (random tokens, 4 examples per row; tok/s and the "
            "cores this process used): the full step, the transformer body alone (the remainder "
            "is the chunked LM head + loss), and the body on 4x shorter rows of the same tokens "
            "(what attending within 512-token rows still costs over 128-token ones):",
            "",
            breakdown_table(parts),
        ]
    if mem:
        section += [
            "",
            "Peak memory of one SmolLM2 scoring step on one device (XLA compiled memory "
            "analysis; RSS sampled every ms in a fresh process while the step runs):",
            "",
            memory_table(mem),
        ]
    publish(section, args.append_results)


def publish(section: list[str], append: bool) -> None:
    """Print a results section and, with `append`, add it to benchmarks/RESULTS.md (among the
    current figures, above History)."""
    text = "\n".join(section) + "\n"
    print()
    print(text)
    if append:
        from results_md import add_section

        add_section(text)


if __name__ == "__main__":
    main()
