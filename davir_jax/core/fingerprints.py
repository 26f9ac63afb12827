"""What identifies a tokenizer: the fingerprint every token cache and run identity carries, and
the ids it can produce (checked against a model's embedding). Functions of a loaded tokenizer
object only, so the data layer and the model layer both use them without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers


def tokenizer_fingerprint(tok: transformers.PreTrainedTokenizerFast) -> str:
    """Hex sha256 identifying everything that decides token ids and chat-formatted prompts.

    Covers the backend tokenizer's full serialization (vocab, merges, added/special tokens with
    their flags, normalizer, pre-tokenizer, post-processor, decoder), the named special tokens and
    the chat template(s). The JSON is re-serialized with sorted keys so the hash does not depend on
    field order; truncation/padding are dropped because they are runtime settings, not identity.
    Meant as a cache key: a tokenizers upgrade that changes the serialization only costs a miss.
    """
    backend = json.loads(tok.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    payload = {
        "version": 1,
        "backend": backend,
        "special_tokens": {
            name: str(value) for name, value in sorted(tok.special_tokens_map.items())
        },
        "chat_template": tok.chat_template,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_id_extent(tok: transformers.PreTrainedTokenizerFast) -> dict[str, Any]:
    """The ids a tokenizer can produce: `size` (len, added tokens included), `max_id` (the
    largest id of the vocabulary or an added token) and `special` (name -> id of bos, eos, pad,
    unk where set). A model must have an embedding row for every one of them."""
    ids = tok.get_vocab().values()  # includes added tokens
    special = {
        name: i
        for name in ("bos", "eos", "pad", "unk")
        if (i := getattr(tok, f"{name}_token_id", None)) is not None
    }
    return {
        "size": len(tok),
        "max_id": max([*ids, len(tok) - 1, *special.values()]),
        "special": special,
    }
