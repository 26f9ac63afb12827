"""Evaluation: per-sequence language-model loss (held-out loss). Generation lives in
`models/generation.py`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from davir_jax.core import storage
from davir_jax.core.io import dumps_json, progress_bar, write_atomic, write_json
from davir_jax.core.runs import check_batch_rows
from davir_jax.core.sharding import mesh_from_config
from davir_jax.data.answers import CHECKERS
from davir_jax.data.dataset import prepare
from davir_jax.data.readers import read_examples
from davir_jax.engine.nll import held_out_loss
from davir_jax.engine.preflight import checked
from davir_jax.models.generation import generate
from davir_jax.models.loading import load_model, load_tokenizer_for


@checked("eval")  # preflight: every input and output checked, the output locked
def run_eval(cfg: Any, progress: bool = True) -> dict[str, Any]:
    """`davir eval`: held-out loss, and generated answers with exact-match accuracy."""

    ec, m = cfg.eval, cfg.model
    if m.source is None or cfg.data.path is None:
        raise ValueError("davir eval needs model.source and data.path")
    mesh = mesh_from_config(cfg.mesh)
    check_batch_rows(cfg, mesh)
    tok = load_tokenizer_for(m.source)  # refused if its ids do not fit the model
    model = load_model(m.source, m.dtype, mesh, **m.run_options())
    data = prepare(cfg.data, tok, progress=progress)
    t0 = time.time()
    loss = held_out_loss(model, data, what=f"the model {m.source}")
    result: dict[str, Any] = {
        "model": m.source,
        "data": str(cfg.data.path),
        "template": cfg.data.template,
        "loss": loss["loss"],
        "mean_example_loss": loss["mean_example_loss"],
        "n_examples": loss["n_examples"],
        "n_tokens": loss["n_tokens"],
        "skipped": dict(data.log.skipped),
        "loss_s": round(time.time() - t0, 2),
    }
    print(
        f"held-out loss {loss['loss']:.4f} nats/token over {loss['n_tokens']:,} response "
        f"tokens of {loss['n_examples']:,} examples",
        file=sys.stderr,
    )
    n_gen = len(data) if ec.generate is None else min(ec.generate, len(data))
    rows = []
    if n_gen:
        answer = (
            ec.answer
            if ec.answer != "auto"
            else ("gsm8k" if data.fields["format"] == "gsm8k" else "exact")
        )
        rows, gen_s = _generate_rows(cfg, model, tok, data, n_gen, CHECKERS[answer], progress)
        result.update(
            {
                "answer_check": answer,
                "n_generated": len(rows),
                "accuracy": float(np.mean([r["correct"] for r in rows])),
                "generation": {
                    "max_new_tokens": ec.max_new_tokens,
                    "temperature": ec.temperature,
                    "top_p": ec.top_p,
                    "seed": cfg.seed,
                },
                "generate_s": round(gen_s, 2),
            }
        )
    if ec.out:
        _write_outputs(storage.upath(ec.out), data, loss, rows, result)
    return result


def _eos_ids(tok: Any, model: Any) -> list[int]:
    """Generation stops at the tokenizer's EOS and every EOS id of the architecture."""
    arch_eos = model.arch.eos_token_id
    arch_eos = arch_eos if isinstance(arch_eos, tuple) else [arch_eos]
    return sorted(({tok.eos_token_id} | set(arch_eos)) - {None})


def _generate_rows(
    cfg: Any, model: Any, tok: Any, data: Any, n_gen: int, check: Any, progress: bool
) -> tuple[list[dict[str, Any]], float]:
    """Generate answers to the first `n_gen` prompts and check each against its reference;
    returns the rows and the seconds spent generating."""
    ec = cfg.eval
    wanted = set(data.example_ids[:n_gen])
    examples = read_examples(
        cfg.data.path, data.fields["format"], source=data.source, fields=cfg.data.fields or None
    )
    refs = {e.example_id: e.response for e in examples if e.example_id in wanted}
    eos = _eos_ids(tok, model)
    rows = []
    t0 = time.time()
    bar = progress_bar(n_gen, "generate", "ex", progress)
    for s in range(0, n_gen, ec.batch_size):
        idx = list(range(s, min(s + ec.batch_size, n_gen)))
        prompts = [ids[: int(np.argmax(mask > 0))].tolist() for ids, mask in data.get(idx)]
        outs = generate(
            model, prompts, ec.max_new_tokens, eos, ec.temperature, ec.top_p, cfg.seed + s
        )
        for i, p, o in zip(idx, prompts, outs):
            eid = data.example_ids[i]
            text = tok.decode(o, skip_special_tokens=True)
            rows.append(
                {
                    "example_id": eid,
                    "prompt": tok.decode(p, skip_special_tokens=False),
                    "reference": refs[eid],
                    "generated": text,
                    "n_generated": len(o),
                    "correct": bool(check(text, refs[eid])),
                }
            )
        bar.update(len(idx))
    bar.close()
    return rows, time.time() - t0


def _write_outputs(
    out: Path, data: Any, loss: dict[str, Any], rows: list[dict], result: dict[str, Any]
) -> None:
    """`examples.jsonl` (per held-out example: what paired comparisons between models
    resample), `generations.jsonl` and `eval.json`."""
    out.mkdir(parents=True, exist_ok=True)
    correct = {r["example_id"]: r["correct"] for r in rows}
    lines = []
    for eid, nll, cnt in zip(data.example_ids, loss["nll"], loss["n_tokens_each"]):
        rec = {
            "example_id": eid,
            "nll": float(nll),
            "n_tokens": int(cnt),
            "loss": float(nll) / max(float(cnt), 1.0),
            **({"correct": correct[eid]} if eid in correct else {}),
        }
        lines.append(dumps_json(rec) + "\n")
    write_atomic(out / "examples.jsonl", "".join(lines))
    if rows:
        write_atomic(
            out / "generations.jsonl",
            "".join(dumps_json(r, ensure_ascii=False) + "\n" for r in rows),
        )
    write_json(out / "eval.json", result)
