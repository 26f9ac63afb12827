"""Load a tokenizer from a Hugging Face directory, a GGUF file, or a registered model name.

Three kinds of ``source`` are accepted by :func:`load_tokenizer`:

* a directory holding Hugging Face tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``),
  loaded with ``transformers.AutoTokenizer`` from local files only;
* a ``.gguf`` file, whose tokenizer is rebuilt from the file's llama.cpp metadata with the ``gguf``
  reader and the ``tokenizers`` building blocks;
* a registered name such as ``"smollm2-135m"`` (see :data:`REGISTERED`), which resolves to a GGUF
  file shipped inside an installed pip package.

The GGUF path deliberately does not go through transformers' own GGUF conversion
(``AutoTokenizer.from_pretrained(..., gguf_file=...)``): the tests use that as an independent
oracle, so it must not also be the implementation. Reading the metadata ourselves also keeps the
pre-tokenizer faithful to llama.cpp, which transformers does not always do (for ``pre="smollm"``
it drops the digit isolation that llama.cpp and the original SmolLM2 ``tokenizer.json`` apply).

Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) GGUF tokenizers whose pre-tokenizer
regex is the GPT-2 one, optionally with single-digit isolation, are supported. Anything else
raises ``ValueError`` rather than silently tokenizing differently from the model's training.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import gguf
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from davir_jax.models.gguf_io import GGUFMetadata
from davir_jax.models.registry import REGISTERED, TokenizerSourceNotFoundError, resolve_registered

__all__ = ["load_tokenizer"]

_GGUF_MAGIC = b"GGUF"

# Files whose presence marks a directory as a Hugging Face tokenizer directory. Checked up front so
# that an empty or wrong directory gives our error instead of AutoTokenizer's hub-oriented one.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

_K = gguf.Keys.Tokenizer

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) that split with the GPT-2 regex after
# isolating every numeric character (llama.cpp regex list ``{"\\p{N}", <gpt2 regex>}``). In HF
# ``tokenizers`` terms that is Digits(individual_digits=True) followed by ByteLevel(use_regex=True),
# which is exactly the pre-tokenizer in SmolLM2's original tokenizer.json.
_DIGIT_ISOLATING_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
# Names llama.cpp maps to the plain GPT-2 regex (ByteLevel's built-in regex, no digit split).
# Names that also make llama.cpp add a SEP token (jina-v1-en, roberta-bpe, ...) are left out on
# purpose: their post-processing is not modelled here.
_GPT2_REGEX_PRE = frozenset(
    {"gpt-2", "phi-2", "mpt", "olmo", "jais", "gigachat", "exaone4", "trillion", "granite-docling"}
)

# GGUF token types (gguf.TokenType); llama.cpp matches CONTROL and USER_DEFINED tokens whole in
# the input text instead of running them through BPE, which is what HF "added tokens" do.
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# HF special-token attribute -> GGUF metadata key holding its id.
_SPECIAL_TOKEN_KEYS = {
    "bos_token": _K.BOS_ID,
    "eos_token": _K.EOS_ID,
    "unk_token": _K.UNK_ID,
    "pad_token": _K.PAD_ID,
    "sep_token": _K.SEP_ID,
    "mask_token": _K.MASK_ID,
}


# --------------------------------------------------------------------------------------------
# Registered names
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_tokenizer(source: str | os.PathLike[str]) -> transformers.PreTrainedTokenizerFast:
    """Load a fast tokenizer from an HF tokenizer directory, a GGUF file or a registered name.

    An existing path always wins over a registered name, so a local directory that happens to be
    called ``smollm2-135m`` is loaded as what it is.
    """
    path = pathlib.Path(os.fspath(source)).expanduser()
    if not path.exists():
        registered = resolve_registered(source)
        if registered is None:
            known = ", ".join(sorted(REGISTERED))
            raise TokenizerSourceNotFoundError(
                f"Tokenizer source {os.fspath(source)!r} is neither an existing file/directory "
                f"nor a registered name ({known})"
            )
        path = registered

    if path.is_dir():
        return _load_hf_directory(path)
    if _is_gguf(path):
        return _load_gguf(path)
    raise ValueError(
        f"{path}: not a GGUF file (no GGUF magic) and not a directory with Hugging Face "
        "tokenizer files"
    )


# --------------------------------------------------------------------------------------------
# Hugging Face directory
# --------------------------------------------------------------------------------------------


def _load_hf_directory(path: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    if not any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
        raise ValueError(
            f"{path}: directory has none of {', '.join(_HF_TOKENIZER_FILES)}; "
            "pass a Hugging Face tokenizer directory or a .gguf file"
        )
    # local_files_only: a tokenizer directory must never trigger a hub download, even when the
    # caller forgot HF_HUB_OFFLINE. trust_remote_code=False: never execute code from the directory.
    tok = transformers.AutoTokenizer.from_pretrained(
        str(path), trust_remote_code=False, local_files_only=True
    )
    # A bad directory, not a programming error, hence ValueError like every other bad source.
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"{path}: loaded a {type(tok).__name__}, which is not a fast (tokenizers-backed) "
            "tokenizer; add a tokenizer.json to the directory"
        )
    return tok


# --------------------------------------------------------------------------------------------
# GGUF file
# --------------------------------------------------------------------------------------------


def _is_gguf(path: pathlib.Path) -> bool:
    # Check the magic rather than trusting the suffix, so a misnamed file gets a clear error here
    # and not an obscure one from deep inside the GGUF reader.
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _load_gguf(path: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE GGUF tokenizer as the `transformers` fast tokenizer llama.cpp would
    run: the vocab, merges, pre-tokenizer, added and special tokens from the GGUF metadata."""
    meta = GGUFMetadata(path)
    model = meta.string(_K.MODEL)
    if model != "gpt2":
        raise ValueError(
            f"{path}: unsupported tokenizer model {_K.MODEL}={model!r}; only byte-level BPE "
            "('gpt2') GGUF tokenizers are supported, use the model's Hugging Face tokenizer "
            "directory instead"
        )
    pre_tokenizer = _gguf_pre_tokenizer(path, meta)
    tokens, vocab = _gguf_vocab(path, meta)
    token_types = meta.integers(_K.TOKEN_TYPE) if _K.TOKEN_TYPE in meta else [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(
            f"{path}: {_K.TOKEN_TYPE!r} has {len(token_types)} entries for {len(tokens)} tokens"
        )
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=_gguf_merges(path, meta, vocab),
            dropout=None,
            unk_token=None,  # byte-level BPE can spell any input; an unk would hide bugs
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()

    control, special = _gguf_added_tokens(path, meta, tokens, token_types, backend)
    add_bos = meta.boolean(_K.ADD_BOS) if _K.ADD_BOS in meta else False
    add_eos = meta.boolean(_K.ADD_EOS) if _K.ADD_EOS in meta else False
    backend.post_processor = _post_processor(path, special, vocab, add_bos, add_eos)

    wrapper_kwargs: dict[str, Any] = dict(special)
    chat_template = _chat_template(meta)
    if chat_template is not None:
        wrapper_kwargs["chat_template"] = chat_template
    # Control tokens other than the named ones are still special to llama.cpp (never produced by
    # BPE, skipped when decoding with skip_special_tokens); expose them as extra special tokens.
    extra = [t for t in control if t not in set(special.values())]
    if extra:
        wrapper_kwargs["extra_special_tokens"] = extra
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=str(path),
        # Passed explicitly so tok.add_bos_token/add_eos_token report the truth; the wrapper then
        # rebuilds an identical TemplateProcessing from them.
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        # Byte-level BPE round-trips exactly; "cleaning" would turn "a ." into "a.".
        clean_up_tokenization_spaces=False,
        **wrapper_kwargs,
    )


def _gguf_added_tokens(
    path: pathlib.Path,
    meta: GGUFMetadata,
    tokens: list[str],
    token_types: list[int],
    backend: Tokenizer,
) -> tuple[list[str], dict[str, str]]:
    """Add the control and user-defined tokens to `backend`; returns the control tokens and the
    named special tokens (`bos_token`: its text, ...)."""
    # Added tokens reuse the ids already in the vocab (tokenizers looks the content up), so the
    # vocab size stays exactly the embedding size. normalized=False: match the raw text.
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL]
    user_defined = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    special: dict[str, str] = {}
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        if key in meta:
            token_id = meta.integer(key)
            if not 0 <= token_id < len(tokens):
                raise ValueError(f"{path}: {key}={token_id} is outside the vocab")
            special[name] = tokens[token_id]
    return control, special


def _gguf_pre_tokenizer(path: pathlib.Path, meta: GGUFMetadata) -> Any:
    pre = meta.string(_K.PRE) if _K.PRE in meta else None
    if pre in _DIGIT_ISOLATING_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if pre in _GPT2_REGEX_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    # llama.cpp falls back to a "default" regex for unknown names; guessing here would give
    # token ids the model never saw in training, so refuse instead.
    supported = ", ".join(sorted(_DIGIT_ISOLATING_PRE | _GPT2_REGEX_PRE))
    raise ValueError(
        f"{path}: unsupported or missing pre-tokenizer {_K.PRE}={pre!r}; "
        f"supported for byte-level BPE: {supported}"
    )


def _gguf_vocab(path: pathlib.Path, meta: GGUFMetadata) -> tuple[list[str], dict[str, int]]:
    tokens = meta.strings(_K.LIST)
    if not tokens:
        raise ValueError(f"{path}: GGUF metadata field {_K.LIST!r} is empty")
    # llama.cpp does the same renaming; an empty string cannot be a usable vocab entry.
    tokens = [tok or f"[EMPTY_{i}]" for i, tok in enumerate(tokens)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        # The dict would keep only the last id of a duplicate, leaving embedding rows unreachable;
        # llama.cpp rejects such a vocab too.
        raise ValueError(f"{path}: {_K.LIST!r} contains duplicate tokens")
    return tokens, vocab


def _gguf_merges(
    path: pathlib.Path, meta: GGUFMetadata, vocab: dict[str, int]
) -> list[tuple[str, str]]:
    if _K.MERGES not in meta:
        raise ValueError(f"{path}: GGUF metadata field {_K.MERGES!r} is missing (needed for BPE)")
    merges = []
    for merge in meta.strings(_K.MERGES):
        # Byte-level tokens never contain a literal space (it is spelled "Ġ"), so exactly one
        # space separates the pair.
        left, sep, right = merge.partition(" ")
        if not sep or " " in right or left not in vocab or right not in vocab:
            raise ValueError(f"{path}: malformed merge {merge!r} in {_K.MERGES!r}")
        merges.append((left, right))
    return merges


def _post_processor(
    path: pathlib.Path,
    special: dict[str, str],
    vocab: dict[str, int],
    add_bos: bool,
    add_eos: bool,
) -> processors.PostProcessor:
    # The transformers wrapper rebuilds an equivalent TemplateProcessing from add_bos_token /
    # add_eos_token; setting one here keeps the bare tokenizers.Tokenizer correct on its own.
    if not (add_bos or add_eos):
        # What SmolLM2's own tokenizer.json uses; it adds nothing and leaves offsets untouched.
        return processors.ByteLevel(trim_offsets=False)
    special_tokens: list[tuple[str, int]] = []
    single, second = "$A:0", "$B:1"
    if add_bos:
        bos = _required(path, special, "bos_token", _K.ADD_BOS)
        special_tokens.append((bos, vocab[bos]))
        single, second = f"{bos}:0 {single}", f"{bos}:1 {second}"
    if add_eos:
        eos = _required(path, special, "eos_token", _K.ADD_EOS)
        special_tokens.append((eos, vocab[eos]))
        single, second = f"{single} {eos}:0", f"{second} {eos}:1"
    # Same layout transformers' update_post_processor builds, so both agree on pairs too.
    return processors.TemplateProcessing(
        single=single, pair=f"{single} {second}", special_tokens=special_tokens
    )


def _required(path: pathlib.Path, special: dict[str, str], name: str, flag_key: str) -> str:
    if name not in special:
        raise ValueError(f"{path}: {flag_key} is true but the GGUF has no {name} id")
    return special[name]


def _chat_template(meta: GGUFMetadata) -> str | dict[str, str] | None:
    default = meta.string(_K.CHAT_TEMPLATE) if _K.CHAT_TEMPLATE in meta else None
    # Named templates (e.g. "tool_use") are listed in tokenizer.chat_templates; transformers
    # accepts them as a dict with the unnamed one under "default".
    names: Sequence[str] = meta.strings(_K.CHAT_TEMPLATES) if _K.CHAT_TEMPLATES in meta else ()
    named = {
        name: meta.string(_K.CHAT_TEMPLATE_N.format(name=name))
        for name in names
        if _K.CHAT_TEMPLATE_N.format(name=name) in meta
    }
    if not named:
        return default
    if default is not None:
        named = {"default": default, **named}
    return named
