"""Readers: local files -> examples (SFT) and preference pairs (DPO).

Every row becomes an `Example` (or a `PreferencePair`) with a stable `example_id` =
`"<source>:<row>"` (row = 0-based line or list index in the file) and a content hash of the row's
text, so scores, selections and checkpoints can always be traced back to the line they came from.
Rows that cannot be used are counted in a `SkipLog` under a reason, with their `file:line`.

File types: `.jsonl` (also `.jsonl.gz`), `.json` (a list of objects, or JSON lines) and
`.parquet` (as exported by Hugging Face `datasets`). Formats (`auto` detects from the first row):

| format | row layout |
| --- | --- |
| `prompt_response` | `{prompt, response}` (or `completion`) |
| `alpaca` | `{instruction, input, output}` |
| `gsm8k` | `{question, answer}` |
| `chat` | `{messages: [{role, content}]}` or ShareGPT `{conversations: [{from, value}]}` |
| `preference` | `{prompt, chosen, rejected}`, strings or message lists (UltraFeedback-binarized) |
| `hh_rlhf` | `{chosen, rejected}` whole `\\n\\nHuman: ... \\n\\nAssistant: ...` transcripts |
| `gsm8k_solutions` | `{question, ground_truth, <model>: {is_correct, solution}}` |

`fields` renames the logical fields of a format for other layouts, e.g.
`{"prompt": "question", "response": "answer"}` for `prompt_response`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from davir_jax.core import storage
from davir_jax.data.skips import DataError, SkipLog

SFT_FORMATS = ("prompt_response", "alpaca", "gsm8k", "chat")
PAIR_FORMATS = ("preference", "hh_rlhf", "gsm8k_solutions")
FORMATS = SFT_FORMATS + PAIR_FORMATS

# Logical field -> default key in the row, per format (overridable with `fields`).
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "prompt_response": {"prompt": "prompt", "response": "response"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "gsm8k": {"question": "question", "answer": "answer"},
    "chat": {"messages": "messages", "role": "role", "content": "content"},
    "preference": {
        "prompt": "prompt",
        "chosen": "chosen",
        "rejected": "rejected",
        "role": "role",
        "content": "content",
    },
    "hh_rlhf": {"chosen": "chosen", "rejected": "rejected"},
    "gsm8k_solutions": {"question": "question", "ground_truth": "ground_truth"},
}

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
_ROLES = ("system", "user", "assistant")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_SPLIT = re.compile("(\n\nHuman:|\n\nAssistant:)")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt/response example in every shape a template needs.

    `prompt_text` is the prompt of the `plain` template; `instruction`/`input` feed the `alpaca`
    template; `messages` (ending with the assistant response) feed the `chat` template.
    """

    example_id: str
    source: str
    row: int
    location: str  # "file:line" for error messages
    content_hash: str
    prompt_text: str
    response: str
    instruction: str
    input: str
    messages: tuple[tuple[str, str], ...]  # (role, content), the last one is the response
    record: str  # the row as read (JSON object text), for writing subsets in the input's format


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt with a chosen and a rejected response (both as `Example`s with the same prompt)."""

    example_id: str
    source: str
    row: int
    location: str
    content_hash: str
    chosen: Example
    rejected: Example
    record: str


# -- raw rows ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RawRow:
    row: int
    location: str
    text: str  # the row as a JSON object text
    value: dict[str, Any]


def _is_json_list(path: Any) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def iter_rows(
    path: str | Path, log: SkipLog, part: int = 0, num_parts: int = 1
) -> Iterator[RawRow]:
    """Stream rows of a local file or URL (`gs://`, `core.storage`: read in ranges as the rows
    are parsed, never downloaded whole); rows with `row % num_parts != part` are not parsed
    (another process owns them), so each bad row is counted exactly once across processes."""
    path = storage.upath(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    name = path.name
    if name.endswith(".parquet"):
        yield from _iter_parquet(path, log, part, num_parts)
    elif name.endswith(".json") and _is_json_list(path):
        yield from _iter_json_list(path, log, part, num_parts)
    elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        yield from _iter_jsonl(path, log, part, num_parts)
    else:
        raise DataError(
            f"{path}: unknown data file type (expected .jsonl, .jsonl.gz, .json or .parquet)"
        )


def _iter_jsonl(path: Any, log: SkipLog, part: int, num_parts: int) -> Iterator[RawRow]:
    gz = path.name.endswith(".gz")
    with path.open("rb") as raw_file, gzip.open(raw_file) if gz else raw_file as f:
        row = -1
        offset = 0  # of the line's first byte in the (decompressed) file
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue  # blank lines are layout, not rows (they get no row index)
            row += 1
            if row % num_parts != part:
                continue
            loc = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{'decompressed' if gz else 'file'} offset {start + e.start}"
                log.skip(
                    "invalid_utf8",
                    loc,
                    f"byte 0x{raw[e.start]:02x}, {e.start} bytes into the line ({where})",
                )
                continue
            text = text.rstrip("\r\n")
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                log.skip("malformed_json", loc, _json_error(text, e))
                continue
            if not isinstance(value, dict):
                log.skip("not_an_object", loc, type(value).__name__)
                continue
            yield RawRow(row, loc, text, value)


def _json_error(line: str, e: json.JSONDecodeError) -> str:
    """json's own message and column within the line, and whether the line was cut short.

    The line is parsed without its line ending, so an error at the end of the text reports the
    last column of this line (not "line 2, column 1" of the newline that followed it).
    """
    end = len(line.rstrip())
    detail = f"{e.msg.removesuffix(' at')} at column {e.colno}"  # "starting at" has its own
    if e.pos >= end or e.msg.startswith("Unterminated string"):
        # Nothing after the error point could complete the value: the row was cut mid-object.
        return f"truncated JSON (the line ends at column {end} inside the value): {detail}"
    return detail


def _iter_json_list(path: Any, log: SkipLog, part: int, num_parts: int) -> Iterator[RawRow]:
    with path.open("rb") as f:
        blob = f.read()
    try:
        data = json.loads(blob.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte "
            f"0x{blob[e.start]:02x} at file offset {e.start}); a JSON list file is read whole"
        ) from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a JSON list file "
            "is read whole"
        ) from e
    for row, value in enumerate(data):
        if row % num_parts != part:
            continue
        loc = f"{path}:[{row}]"
        if not isinstance(value, dict):
            log.skip("not_an_object", loc, type(value).__name__)
            continue
        yield RawRow(row, loc, json.dumps(value, ensure_ascii=False), value)


def _iter_parquet(path: Any, log: SkipLog, part: int, num_parts: int) -> Iterator[RawRow]:
    with contextlib.ExitStack() as stack:
        try:
            pf = stack.enter_context(storage.parquet_file(path))
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read parquet ({e})") from e
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for value in batch.to_pylist():
                if row % num_parts == part:
                    text = json.dumps(value, ensure_ascii=False, default=str)
                    yield RawRow(row, f"{path}:row {row}", text, value)
                row += 1


# -- formats -----------------------------------------------------------------------------------


class _Bad(Exception):
    """A row-level problem: (reason, detail)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _get(
    value: Mapping[str, Any], key: str, types: tuple[type, ...] = (str,), required: bool = True
):
    if key not in value or value[key] is None:
        if required:
            raise _Bad("missing_field", repr(key))
        return None
    v = value[key]
    if not isinstance(v, types) or isinstance(v, bool):
        raise _Bad(
            "wrong_type",
            f"{key!r} is {type(v).__name__}, expected {'/'.join(t.__name__ for t in types)}",
        )
    return v


def detect_format(value: Mapping[str, Any]) -> str:
    """Guess the format from a row's keys."""
    keys = set(value)
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "ground_truth"} <= keys:
        return "gsm8k_solutions"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"chosen", "rejected"} <= keys:
        return "preference" if "prompt" in keys else "hh_rlhf"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "prompt" in keys and ({"response", "completion"} & keys):
        return "prompt_response"
    raise DataError(f"cannot detect the data format from the keys {sorted(keys)}; set data.format")


def _example(
    raw: RawRow,
    source: str,
    prompt_text: str,
    response: str,
    instruction: str,
    inp: str,
    messages: list[tuple[str, str]],
    suffix: str = "",
) -> Example:
    if not response.strip():
        raise _Bad("empty_response", "")
    return Example(
        example_id=f"{source}:{raw.row}{suffix}",
        source=source,
        row=raw.row,
        location=raw.location,
        content_hash=hashlib.sha256(raw.text.encode()).hexdigest()[:16],
        prompt_text=prompt_text,
        response=response,
        instruction=instruction,
        input=inp,
        messages=tuple(messages),
        record=raw.text,
    )


def _from_prompt(raw: RawRow, source: str, prompt: str, response: str, inp: str = "") -> Example:
    # `plain` prompt for Alpaca rows: instruction, plus "\n\n" and the input when not empty.
    text = prompt + ("\n\n" + inp if inp else "")
    return _example(
        raw, source, text, response, prompt, inp, [("user", text), ("assistant", response)]
    )


def _messages(value: Any, f: Mapping[str, str], field: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Bad("wrong_type", f"{field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad("wrong_type", f"{field}[{i}] is {type(m).__name__}, expected an object")
        if "from" in m and f["role"] not in m:  # ShareGPT
            role, content = _get(m, "from"), _get(m, "value")
            role = _SHAREGPT_ROLES.get(role.lower())
            if role is None:
                raise _Bad("wrong_type", f"{field}[{i}].from={m['from']!r} is not a known speaker")
        else:
            role, content = _get(m, f["role"]), _get(m, f["content"])
            if role not in _ROLES:
                raise _Bad("wrong_type", f"{field}[{i}].role={role!r} is not system/user/assistant")
        out.append((role, content))
    return out


def _plain_prompt(messages: list[tuple[str, str]]) -> str:
    """`plain` prompt of a conversation: the turns' contents joined by a blank line."""
    return "\n\n".join(c for _, c in messages)


def _from_messages(
    raw: RawRow, source: str, msgs: list[tuple[str, str]], suffix: str = ""
) -> Example:
    if msgs[-1][0] != "assistant":
        raise _Bad("no_assistant_turn", f"last role is {msgs[-1][0]!r}")
    prompt = msgs[:-1]
    if not prompt:
        raise _Bad("empty_prompt", "the conversation has no turn before the assistant's")
    text = _plain_prompt(prompt)
    return _example(raw, source, text, msgs[-1][1], text, "", msgs, suffix)


def parse_hh(transcript: str) -> tuple[str, str, list[tuple[str, str]]]:
    """Split an HH-RLHF transcript at its last assistant turn.

    Returns `(prompt_text, response, messages)`: `prompt_text` ends with "\\n\\nAssistant:", the
    response keeps its leading space (so prompt + response is the transcript), and `messages` are
    the turns with stripped contents for chat templates.
    """
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Bad("no_assistant_turn", "no '\\n\\nAssistant:' in the transcript")
    prompt, response = transcript[: cut + len(HH_ASSISTANT)], transcript[cut + len(HH_ASSISTANT) :]
    # Turns of the prompt part: ["", marker, text, marker, text, ...].
    parts = _HH_SPLIT.split(prompt[: -len(HH_ASSISTANT)])
    if parts[0].strip():
        raise _Bad("wrong_type", "text before the first '\\n\\nHuman:'")
    msgs = [
        ("user" if marker == HH_HUMAN else "assistant", text.strip())
        for marker, text in zip(parts[1::2], parts[2::2])
    ]
    if not any(role == "user" for role, _ in msgs):
        # (A few real transcripts have two assistant turns in a row; that is kept.)
        raise _Bad("wrong_type", "the transcript has no human turn before the assistant reply")
    return prompt, response, msgs + [("assistant", response.strip())]


def _parse_sft(raw: RawRow, fmt: str, f: Mapping[str, str], source: str) -> Example:
    v = raw.value
    if fmt == "prompt_response":
        key = f["response"] if f["response"] in v or "completion" not in v else "completion"
        return _from_prompt(raw, source, _get(v, f["prompt"]), _get(v, key))
    if fmt == "alpaca":
        inp = _get(v, f["input"], required=False) or ""
        return _from_prompt(raw, source, _get(v, f["instruction"]), _get(v, f["output"]), inp)
    if fmt == "gsm8k":
        return _from_prompt(raw, source, _get(v, f["question"]), _get(v, f["answer"]))
    if fmt == "chat":
        key = f["messages"] if f["messages"] in v or "conversations" not in v else "conversations"
        if key not in v:
            raise _Bad("missing_field", repr(f["messages"]))
        return _from_messages(raw, source, _messages(v[key], f, key))
    raise DataError(f"format {fmt!r} is a preference format; read it with read_pairs")


def _pair_side(raw: RawRow, source: str, prompt: Any, response: Any, f, side: str) -> Example:
    if isinstance(response, list):  # UltraFeedback: the full conversation incl. the reply
        return _from_messages(raw, source, _messages(response, f, side), f"/{side}")
    if not isinstance(response, str):
        raise _Bad("wrong_type", f"{side!r} is {type(response).__name__}")
    if isinstance(prompt, list):
        return _from_messages(
            raw, source, _messages(prompt, f, "prompt") + [("assistant", response)], f"/{side}"
        )
    ex = _from_prompt(raw, source, prompt, response)
    return dataclasses.replace(ex, example_id=ex.example_id + f"/{side}")


def _parse_pair(raw: RawRow, fmt: str, f: Mapping[str, str], source: str) -> PreferencePair:
    v = raw.value
    if fmt == "preference":
        prompt = v.get(f["prompt"])
        if prompt is None:
            raise _Bad("missing_field", repr(f["prompt"]))
        if not isinstance(prompt, (str, list)):
            raise _Bad("wrong_type", f"{f['prompt']!r} is {type(prompt).__name__}")
        c = v.get(f["chosen"])
        r = v.get(f["rejected"])
        if c is None or r is None:
            raise _Bad("missing_field", repr(f["chosen"] if c is None else f["rejected"]))
        chosen = _pair_side(raw, source, prompt, c, f, "chosen")
        rejected = _pair_side(raw, source, prompt, r, f, "rejected")
    elif fmt == "hh_rlhf":
        cp, cr, cm = parse_hh(_get(v, f["chosen"]))
        rp, rr, rm = parse_hh(_get(v, f["rejected"]))
        if cp != rp:
            raise _Bad("prompt_mismatch", "the transcripts differ before the last assistant turn")
        chosen = _example(raw, source, cp, cr, cp, "", cm, "/chosen")
        rejected = _example(raw, source, rp, rr, rp, "", rm, "/rejected")
    elif fmt == "gsm8k_solutions":
        q = _get(v, f["question"])
        truth = _get(v, f["ground_truth"])
        wrong = None
        for model in sorted(k for k in v if k not in (f["question"], f["ground_truth"])):
            sol = v[model]
            if (
                isinstance(sol, dict)
                and sol.get("is_correct") is False
                and isinstance(sol.get("solution"), str)
            ):
                wrong = sol["solution"]  # the first incorrect solution, models in name order
                break
        if wrong is None:
            raise _Bad("no_rejected", "every model solution is correct")
        chosen = dataclasses.replace(
            _from_prompt(raw, source, q, truth), example_id=f"{source}:{raw.row}/chosen"
        )
        rejected = dataclasses.replace(
            _from_prompt(raw, source, q, wrong), example_id=f"{source}:{raw.row}/rejected"
        )
    else:
        raise DataError(f"format {fmt!r} is not a preference format; read it with read_examples")
    return PreferencePair(
        example_id=f"{source}:{raw.row}",
        source=source,
        row=raw.row,
        location=raw.location,
        content_hash=chosen.content_hash,
        chosen=chosen,
        rejected=rejected,
        record=raw.text,
    )


def source_name(path: str | Path) -> str:
    """Default source name of a file: its name without data extensions (`tasks_v1.jsonl` ->
    `tasks_v1`)."""
    name = Path(path).name
    for ext in (".gz", ".jsonl", ".json", ".parquet"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def _resolve(
    path: str | Path,
    fmt: str,
    fields: Mapping[str, str] | None,
    log: SkipLog,
    part: int,
    num_parts: int,
):
    rows = iter_rows(path, log, part, num_parts)
    if fmt == "auto":
        # Detect from the first row of the whole file (not of this part) so every process agrees.
        probe_log = SkipLog()
        probe = next(iter_rows(path, probe_log), None)
        if probe is None:
            raise DataError(_no_row_reason(storage.upath(path), probe_log))
        try:
            fmt = detect_format(probe.value)
        except DataError as e:
            raise DataError(f"{probe.location}: {e}") from None
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    f = dict(DEFAULT_FIELDS[fmt])
    for k, val in (fields or {}).items():
        if k not in f:
            raise DataError(
                f"data.fields.{k}: not a field of format {fmt!r} (fields: {', '.join(f)})"
            )
        f[k] = val
    return fmt, f, rows


def _no_row_reason(path: Any, probe: SkipLog) -> str:
    """Why a file has no row to detect the format from: empty, not UTF-8, or every row bad."""
    if not probe.total:
        what = "an empty file" if storage.size(path) == 0 else "no rows (only blank lines)"
        if path.name.endswith(".gz"):
            what = "no rows (its decompressed data is empty or blank)"
        elif path.name.endswith(".parquet"):
            what = "a parquet file with no rows"
        elif path.name.endswith(".json") and _is_json_list(path):
            what = "an empty JSON list"
        return f"{path}: {what}; there is no data to read"
    counts = ", ".join(f"{n} {r}" for r, n in sorted(probe.skipped.items()))
    if "invalid_utf8" in probe.skipped:
        # (A UTF-16 file splits into "lines" at its 0x0a bytes; some may decode as junk JSON.)
        with path.open("rb") as f:
            bom = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
        first = probe.where["invalid_utf8"][0].removeprefix(f"{path}:")
        return f"{path}: not UTF-8 text ({counts}); first bad byte on line {first}" + (
            "; the file starts with a UTF-16 byte-order mark, convert it to UTF-8" if bom else ""
        )
    first = probe.where[next(iter(probe.skipped))][0]
    return f"{path}: none of its {probe.total} rows is readable ({counts}); first: {first}"


def resolve_format(path: str | Path, fmt: str = "auto") -> str:
    """The concrete format of a file (`auto` detected from its first readable row)."""
    return _resolve(path, fmt, None, SkipLog(), 0, 1)[0]


def read_examples(
    path: str | Path,
    fmt: str = "auto",
    log: SkipLog | None = None,
    source: str | None = None,
    fields: Mapping[str, str] | None = None,
    part: int = 0,
    num_parts: int = 1,
) -> Iterator[Example]:
    """Stream SFT examples of a file (this process's `part` of `num_parts`); bad rows go to `log`.

    Preference formats yield their chosen side (for SFT on preferred answers).
    """

    def parse(raw: RawRow, fmt: str, f: Mapping[str, str], source: str) -> Example:
        if fmt in PAIR_FORMATS:
            return _parse_pair(raw, fmt, f, source).chosen
        return _parse_sft(raw, fmt, f, source)

    yield from _stream(parse, path, fmt, log, source, fields, part, num_parts)


def _stream(parse, path, fmt, log, source, fields, part, num_parts, pairs_only=False):
    """Rows of this process's part, parsed; a row-level problem is counted in `log`."""
    log = SkipLog() if log is None else log
    fmt, f, rows = _resolve(path, fmt, fields, log, part, num_parts)
    if pairs_only and fmt not in PAIR_FORMATS:
        raise DataError(
            f"{path}: format {fmt!r} has no preference pairs (use {', '.join(PAIR_FORMATS)})"
        )
    source = source or source_name(path)
    for raw in rows:
        try:
            yield parse(raw, fmt, f, source)
        except _Bad as b:
            log.skip(b.reason, raw.location, b.detail)


def read_pairs(
    path: str | Path,
    fmt: str = "auto",
    log: SkipLog | None = None,
    source: str | None = None,
    fields: Mapping[str, str] | None = None,
    part: int = 0,
    num_parts: int = 1,
) -> Iterator[PreferencePair]:
    """Stream preference pairs of a file; bad rows go to `log`."""
    yield from _stream(_parse_pair, path, fmt, log, source, fields, part, num_parts, True)
