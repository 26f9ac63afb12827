"""Two small word-level tokenizers (one adds BOS, one does not) for hand-worked mask checks.

Word level makes every expected id list easy to write by hand: one word, one id.
"""

from __future__ import annotations

import transformers
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

WORDS = (
    "hello world how are you i am fine add two and three is five what the of answer "
    "below an instruction that describes a task write response appropriately completes "
    "request . # : , paired with input provides further context ### instruction response "
    "user assistant system"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]

# A chat template in the usual style: BOS text once, every turn ends with the EOS token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_TEMPLATE_NO_BOS = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def vocab() -> dict[str, int]:
    toks = SPECIALS + list(dict.fromkeys(WORDS))
    return {t: i for i, t in enumerate(toks)}


def word_tokenizer(add_bos: bool) -> transformers.PreTrainedTokenizerFast:
    v = vocab()
    tok = Tokenizer(WordLevel(v, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(SPECIALS)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", v["<s>"])]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE if add_bos else CHAT_TEMPLATE_NO_BOS,
    )
