"""Readers: every format and file type, stable ids, and every bad input counted or fatal."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from davir_jax.data.readers import parse_hh, read_examples, read_pairs, resolve_format
from davir_jax.data.skips import DataError, SkipLog


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_jsonl_json_list_parquet_gz_agree(tmp_path):
    rows = [
        {"instruction": "add two and three", "input": "", "output": "five"},
        {"instruction": "say hello", "input": "world", "output": "hello world"},
    ]
    files = [_jsonl(tmp_path / "a.jsonl", rows)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    files.append(tmp_path / "a.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    files.append(tmp_path / "a.parquet")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    files.append(tmp_path / "a.jsonl.gz")
    for path in files:
        got = list(read_examples(path))
        assert resolve_format(path) == "alpaca"
        assert [e.example_id for e in got] == ["a:0", "a:1"], path
        assert got[0].prompt_text == "add two and three" and got[0].response == "five"
        # plain prompt for Alpaca rows: instruction + "\n\n" + input when the input is not empty
        assert got[1].prompt_text == "say hello\n\nworld"
        assert (got[1].instruction, got[1].input) == ("say hello", "world")
        assert got[1].messages == (("user", "say hello\n\nworld"), ("assistant", "hello world"))
        assert json.loads(got[1].record) == rows[1]


def test_ids_and_hashes_are_stable_and_content_based(tmp_path):
    a = list(read_examples(_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r"}] * 2)))
    assert a[0].content_hash == a[1].content_hash and a[0].example_id != a[1].example_id
    b = list(read_examples(_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "x"}])))
    assert b[0].content_hash != a[0].content_hash
    c = list(read_examples(tmp_path / "s.jsonl", source="pool"))
    assert c[0].example_id == "pool:0"


@pytest.mark.parametrize(
    "row,fmt,prompt,response",
    [
        ({"prompt": "p", "response": "r"}, "prompt_response", "p", "r"),
        ({"prompt": "p", "completion": "c"}, "prompt_response", "p", "c"),
        ({"question": "q", "answer": "a #### 3"}, "gsm8k", "q", "a #### 3"),
        (
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "chat",
            "s\n\nu",
            "a",
        ),
        (
            {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
            "chat",
            "u",
            "a",
        ),
    ],
)
def test_sft_formats(tmp_path, row, fmt, prompt, response):
    path = _jsonl(tmp_path / "d.jsonl", [row])
    assert resolve_format(path) == fmt
    (ex,) = read_examples(path)
    assert (ex.prompt_text, ex.response) == (prompt, response)
    assert ex.messages[-1] == ("assistant", response)


def test_configurable_fields(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "why", "a": "because"}])
    (ex,) = read_examples(path, "prompt_response", fields={"prompt": "q", "response": "a"})
    assert (ex.prompt_text, ex.response) == ("why", "because")
    with pytest.raises(DataError, match="data.fields.nope"):
        list(read_examples(path, "prompt_response", fields={"nope": "q"}))


def test_preference_strings_and_message_lists(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {  # UltraFeedback-binarized layout
            "prompt": "p2",
            "chosen": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "g"}],
            "rejected": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "b"}],
        },
    ]
    pairs = list(read_pairs(_jsonl(tmp_path / "pref.jsonl", rows)))
    assert [p.example_id for p in pairs] == ["pref:0", "pref:1"]
    assert (pairs[0].chosen.response, pairs[0].rejected.response) == ("good", "bad")
    assert pairs[1].chosen.messages == (("user", "p2"), ("assistant", "g"))
    assert pairs[1].rejected.prompt_text == pairs[1].chosen.prompt_text == "p2"


def test_hh_transcript_split_at_last_assistant_turn(tmp_path):
    t = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    prompt, response, msgs = parse_hh(t)
    assert prompt + response == t
    assert prompt.endswith("\n\nAssistant:") and response == " fine, thanks"
    assert msgs == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "how are you?"),
        ("assistant", "fine, thanks"),
    ]
    rows = [
        {"chosen": t, "rejected": t.replace("fine, thanks", "go away")},
        {"chosen": t, "rejected": t.replace("hi", "yo").replace("fine, thanks", "x")},
    ]
    log = SkipLog()
    pairs = list(read_pairs(_jsonl(tmp_path / "hh.jsonl", rows), log=log))
    assert len(pairs) == 1 and pairs[0].rejected.response == " go away"
    assert log.skipped == {"prompt_mismatch": 1}
    assert log.where["prompt_mismatch"][0].startswith(f"{tmp_path / 'hh.jsonl'}:2")


def test_real_hh_rlhf(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    log = SkipLog()
    pairs = list(read_pairs(path, log=log))
    assert len(pairs) + log.total == 2312
    assert len(pairs) > 2250
    for p in pairs[:200]:
        assert p.chosen.prompt_text == p.rejected.prompt_text
        assert p.chosen.prompt_text.endswith("\n\nAssistant:")


def test_real_gsm8k_model_solutions(shared_data):
    path = shared_data / "gsm8k" / "example_model_solutions.jsonl"
    log = SkipLog()
    pairs = list(read_pairs(path, log=log))
    assert (
        len(pairs) + log.skipped["no_rejected"] == 1319 and log.total == log.skipped["no_rejected"]
    )
    row = json.loads(pairs[0].record)
    assert pairs[0].chosen.response == row["ground_truth"]
    wrong = [
        v["solution"] for k, v in sorted(row.items()) if isinstance(v, dict) and not v["is_correct"]
    ]
    assert pairs[0].rejected.response == wrong[0]
    assert pairs[0].chosen.prompt_text == row["question"]


def test_real_alpaca_libre_malformed_lines(shared_data):
    """The 14 malformed JSON lines of alpaca-libre are counted with their file:line."""
    total = SkipLog()
    kept = 0
    for name in ("tasks_v1", "tasks_v2", "tasks_v3"):
        log = SkipLog()
        kept += sum(
            1 for _ in read_examples(shared_data / "alpaca-libre" / f"{name}.jsonl", log=log)
        )
        total.merge(log)
    assert total.skipped["malformed_json"] == 14
    assert kept + total.total == 5874
    assert total.where["malformed_json"][0].endswith(
        "tasks_v2.jsonl:2279: Expecting ',' delimiter at column 97"
    )
    with pytest.raises(DataError, match=r"tasks_v2.jsonl:42: empty_response"):
        list(
            read_examples(shared_data / "alpaca-libre" / "tasks_v2.jsonl", log=SkipLog(strict=True))
        )


BAD_ROWS = [
    (b'{"prompt": "p", "response": "r"\n', "malformed_json"),
    (b'{"prompt": "p", "response": "\xff\xfe"}\n', "invalid_utf8"),
    (b'["prompt", "response"]\n', "not_an_object"),
    (b'{"prompt": "p"}\n', "missing_field"),
    (b'{"prompt": "p", "response": 3}\n', "wrong_type"),
    (b'{"prompt": "p", "response": "  "}\n', "empty_response"),
]


@pytest.mark.parametrize("line,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_rows_counted_then_fatal_in_strict(tmp_path, line, reason):
    good = b'{"prompt": "p", "response": "r"}\n'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + line + good)
    log = SkipLog()
    got = list(read_examples(path, "prompt_response", log=log))
    assert [e.example_id for e in got] == ["bad:0", "bad:2"]
    assert log.skipped == {reason: 1}
    assert log.where[reason][0].startswith(f"{path}:2")
    assert reason in log.report()
    with pytest.raises(DataError, match=f"{path}:2: {reason}"):
        list(read_examples(path, "prompt_response", log=SkipLog(strict=True)))


@pytest.mark.parametrize(
    "row,fmt,reason",
    [
        ({"messages": [{"role": "user", "content": "u"}]}, "chat", "no_assistant_turn"),
        ({"messages": [{"role": "robot", "content": "u"}]}, "chat", "wrong_type"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "chat", "empty_prompt"),
        (
            {"question": "q", "ground_truth": "t", "m": {"is_correct": True, "solution": "s"}},
            "gsm8k_solutions",
            "no_rejected",
        ),
        ({"chosen": "no markers", "rejected": "x"}, "hh_rlhf", "no_assistant_turn"),
    ],
)
def test_format_level_skips(tmp_path, row, fmt, reason):
    path = _jsonl(tmp_path / "d.jsonl", [row])
    log = SkipLog()
    reader = read_pairs if fmt in ("gsm8k_solutions", "hh_rlhf") else read_examples
    assert list(reader(path, fmt, log=log)) == []
    assert log.skipped == {reason: 1}
    with pytest.raises(DataError, match=reason):
        list(reader(path, fmt, log=SkipLog(strict=True)))


def test_parts_partition_rows_and_skips(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join([b'{"prompt": "p", "response": "r"}\n'] * 5 + [b"{bad\n"] * 3))
    seen, total = [], SkipLog()
    for part in range(3):
        log = SkipLog()
        seen += [e.row for e in read_examples(path, "prompt_response", log, part=part, num_parts=3)]
        total.merge(log)
    assert sorted(seen) == [0, 1, 2, 3, 4] and total.skipped == {"malformed_json": 3}


def test_unknown_file_type_and_format(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type"):
        list(read_examples(tmp_path / "d.csv"))
    path = _jsonl(tmp_path / "d.jsonl", [{"x": 1}])
    with pytest.raises(DataError, match="cannot detect the data format"):
        list(read_examples(path))
    with pytest.raises(DataError, match="no such data file"):
        list(read_examples(tmp_path / "missing.jsonl"))


GOOD = b'{"prompt": "p", "response": "r"}\n'


@pytest.mark.parametrize(
    "line,detail",
    [
        # Cut mid-string: json's own cause and column within the line, not "column 1" of line 2.
        (
            b'{"prompt": "a", "resp\n',
            "truncated JSON (the line ends at column 21 inside the value): "
            "Unterminated string starting at column 17",
        ),
        # Cut after a complete value: the line ends where a ',' or '}' should come.
        (
            b'{"prompt": "a", "response": "b"\n',
            "truncated JSON (the line ends at column 31 inside the value): "
            "Expecting ',' delimiter at column 32",
        ),
        # Not truncated: the error is inside the line, reported where json found it.
        (b'{"prompt": "a" "response": "b"}\n', "Expecting ',' delimiter at column 16"),
    ],
)
def test_malformed_json_names_the_true_column_and_cause(tmp_path, line, detail):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(GOOD + GOOD + line)
    log = SkipLog()
    assert len(list(read_examples(path, "prompt_response", log=log))) == 2
    assert log.where["malformed_json"] == [f"{path}:3: {detail}"]
    with pytest.raises(DataError, match=f"{path}:3: malformed_json"):
        list(read_examples(path, "prompt_response", log=SkipLog(strict=True)))


def test_invalid_utf8_names_the_byte_and_its_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD + b'{"prompt": "caf\xe9", "response": "r"}\n')
    log = SkipLog()
    assert len(list(read_examples(path, "prompt_response", log=log))) == 1
    # 0xe9 is the 16th byte of line 2 (15 bytes precede it), and len(GOOD) + 15 into the file.
    assert log.where["invalid_utf8"] == [
        f"{path}:2: byte 0xe9, 15 bytes into the line (file offset {len(GOOD) + 15})"
    ]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", b"", "an empty file; there is no data to read"),
        ("blank.jsonl", b"\n  \n", r"no rows \(only blank lines\)"),
        ("empty.json", b"[]", "an empty JSON list"),
        (
            "utf16.jsonl",
            '{"prompt": "p", "response": "r"}\n'.encode("utf-16"),
            r"not UTF-8 text \(1 invalid_utf8, 1 malformed_json\); first bad byte on line 1: "
            r"byte 0xff, 0 bytes "
            r"into the line \(file offset 0\); the file starts with a UTF-16 byte-order mark",
        ),
        (
            "latin1.jsonl",
            b'{"prompt": "caf\xe9", "response": "r"}\n',
            r"not UTF-8 text \(1 invalid_utf8\); first bad byte on line 1: byte 0xe9, 15 bytes "
            r"into the line \(file offset 15\)$",
        ),
        (
            "bad.jsonl",
            b'{"prompt": "a", "resp\n[1, 2]\n{"prompt": "a" "b"}\n',
            r"none of its 3 rows is readable \(2 malformed_json, 1 not_an_object\); first: "
            r".*bad.jsonl:1: truncated JSON",
        ),
    ],
)
def test_no_row_to_detect_the_format_from_says_why(tmp_path, name, content, message):
    """An empty file, a file that is not UTF-8 and a file of bad rows each get their own cause,
    with the file named (was one message, "no readable row ...; set data.format", for all)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        resolve_format(path)


def test_dropped_pairs_are_counted_once(tmp_path):
    """A pair is kept or dropped whole, so it is counted once even when both sides fail: the
    skip total equals the pairs dropped, in the log, the manifest and the printed report."""
    from toy_tokenizers import word_tokenizer

    from davir_jax.data.config import DataConfig
    from davir_jax.data.dataset import prepare

    long = "i am fine and you are fine"  # 7 words + EOS: too long for max_len 6 with a prompt
    rows = [
        {"prompt": "hello", "chosen": "world", "rejected": "fine"},  # kept
        {"prompt": "hello", "chosen": long, "rejected": "fine"},  # chosen too long
        {"prompt": "hello", "chosen": "world", "rejected": long},  # rejected too long
        {"prompt": "hello", "chosen": long, "rejected": long},  # both: one pair, one skip
        {"prompt": "hello", "chosen": "<s> world", "rejected": long},  # two reasons, one skip
    ]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_len=6)
    data = prepare(cfg, word_tokenizer(True), pairs=True, progress=False)
    assert len(data) == 2  # one pair, stored as its two sides
    assert data.log.skipped == {"too_long": 3, "special_token_in_text": 1}
    assert data.log.total == 4
    # The chosen side's reason counts; the other side's is named in the detail.
    where = data.log.where
    assert where["too_long"][2].startswith(f"{path}:4: pairs:3/chosen: 10 tokens > 6")
    assert where["too_long"][2].endswith(
        "; the other side too: too_long (pairs:3/rejected: 10 tokens > 6)"
    )
    assert where["special_token_in_text"] == [
        f"{path}:5: pairs:4/chosen: BOS inside; the other side too: too_long "
        "(pairs:4/rejected: 10 tokens > 6)"
    ]
    manifest = json.loads((data.directory / "manifest.json").read_text())
    assert manifest["skipped"] == {"too_long": 3, "special_token_in_text": 1}
    assert manifest["n_pairs"] == 1 and manifest["n_examples"] == 2
    assert data.log.report(1, "pairs").startswith("kept 1 pairs, skipped 4\n")
