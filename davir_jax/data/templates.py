"""Templates: an example -> token ids and the exact loss mask (response tokens plus EOS).

Three templates, each defined exactly so anyone can reproduce our numbers:

* `plain`: `input_ids = tokenizer(prompt)` with the tokenizer's default special tokens (a BOS if it
  adds one), then `tokenizer(response, add_special_tokens=False)`, then the EOS id. For Alpaca
  rows the prompt is the instruction, plus "\\n\\n" and the input when the input is not empty.
* `alpaca`: the same with the Stanford Alpaca prompt texts (with and without input); the response
  follows "### Response:" directly, as in Stanford Alpaca's `train.py`.
* `chat`: the tokenizer's own chat template. The prompt is the rendered conversation up to the
  assistant turn's content (`add_generation_prompt=True`), the response is the rest of the
  rendered conversation up to and including the first EOS (end-of-turn) token; the template's text
  after it (e.g. a newline) is not part of the sequence. No special tokens are added beyond what
  the template writes (transformers' own `apply_chat_template(tokenize=True)` convention).

The loss mask covers exactly the response tokens and the EOS; with `eos_in_loss=False` the EOS stays
in the sequence (the ids are unchanged) but its mask entry is 0, so no loss counts it (see
`DataConfig.eos_in_loss`). BOS appears at most once. Prompt and
response are tokenized separately (so the mask boundary is exact); when the prompt's tokens are
not a prefix of the joint tokenization (a merge across the boundary) the example is kept and a
`boundary_merge` warning is counted. Over-long examples are dropped (`overlong="drop"`) or have
their prompt cut from the left (`"truncate_left"`); the response is never cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from davir_jax.data.readers import Example
from davir_jax.data.skips import DataError, SkipLog

TEMPLATES = ("plain", "alpaca", "chat")
OVERLONG = ("drop", "truncate_left")

# Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids `[L]` int32 and the loss mask `[L]` uint8 (1 = response token, or the EOS when
    it is counted)."""

    example_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def n_tokens(self) -> int:
        """Loss tokens (the response, plus EOS when counted): the T of method.md."""
        return int(self.loss_mask.sum())


def alpaca_prompt(instruction: str, inp: str) -> str:
    """The Stanford Alpaca prompt text for an instruction and an optional input."""
    if inp:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=inp)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


class Encoder:
    """Tokenizes examples with one template; batched (the tokenizer's fast batch path)."""

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        max_len: int,
        overlong: str = "drop",
        eos_in_loss: bool = True,
    ) -> None:
        if template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
        if overlong not in OVERLONG:
            raise DataError(f"unknown overlong policy {overlong!r}; known: {', '.join(OVERLONG)}")
        if max_len < 2:
            raise DataError(f"max_len must be at least 2, got {max_len}")
        if tokenizer.eos_token_id is None:
            raise DataError(
                "the tokenizer has no EOS token; every template ends the response with it"
            )
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'chat' needs a tokenizer with a chat template")
        self.tok, self.template, self.max_len, self.overlong = (
            tokenizer,
            template,
            max_len,
            overlong,
        )
        self.eos_in_loss = eos_in_loss
        self.eos = int(tokenizer.eos_token_id)
        self.bos = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
        # Some tokenizers' post-processors also append EOS to every text; a prompt must not end
        # the sequence, so that EOS is removed from the prompt (and from the joint tokenization).
        probe = tokenizer("a")["input_ids"]
        self._adds_bos = bool(probe) and self.bos is not None and probe[0] == self.bos
        self._strips_eos = (
            bool(probe)
            and probe[-1] == self.eos
            and (tokenizer("a", add_special_tokens=False)["input_ids"][-1:] != [self.eos])
        )

    # -- texts ----------------------------------------------------------------------------------

    def texts(self, ex: Example) -> tuple[str, str]:
        """(prompt text, response text) as this template renders them."""
        if self.template == "plain":
            return ex.prompt_text, ex.response
        if self.template == "alpaca":
            return alpaca_prompt(ex.instruction, ex.input), ex.response
        msgs = [{"role": r, "content": c} for r, c in ex.messages]
        prompt = self.tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = self.tok.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            return prompt, None  # type: ignore[return-value]  # reported as template_mismatch
        return prompt, full[len(prompt) :]

    # -- tokens ---------------------------------------------------------------------------------

    def _ids(self, texts: list[str], specials: bool) -> list[list[int]]:
        if not texts:
            return []
        out = self.tok(texts, add_special_tokens=specials)["input_ids"]
        if specials and self._strips_eos:
            out = [x[:-1] if x and x[-1] == self.eos else x for x in out]
        return out

    def encode(self, examples: Sequence[Example], log: SkipLog) -> list[Encoded | None]:
        """Encode a batch; a skipped example is `None` (and counted in `log`)."""
        rendered = [self.texts(ex) for ex in examples]
        ok = [i for i, (_, r) in enumerate(rendered) if r is not None]
        for i, (_, r) in enumerate(rendered):
            if r is None:
                ex = examples[i]
                log.skip("template_mismatch", ex.location, ex.example_id)
        specials = self.template != "chat"
        prompts = self._ids([rendered[i][0] for i in ok], specials)
        responses = self._ids([rendered[i][1] for i in ok], False)
        joint = self._ids([rendered[i][0] + rendered[i][1] for i in ok], specials)
        out: list[Encoded | None] = [None] * len(examples)
        for i, p, r, j in zip(ok, prompts, responses, joint):
            out[i] = self._one(examples[i], p, r, j, log)
        return out

    def _one(
        self, ex: Example, p: list[int], r: list[int], joint: list[int], log: SkipLog
    ) -> Encoded | None:
        if self.bos is not None:
            while len(p) >= 2 and p[0] == self.bos and p[1] == self.bos:  # BOS at most once
                p = p[1:]
            if self._adds_bos and (self.bos in p[1:] or self.bos in r):
                # A second BOS would restart the sequence mid-example.
                log.skip("special_token_in_text", ex.location, f"{ex.example_id}: BOS inside")
                return None
        if joint[: len(p)] != p:
            log.warn("boundary_merge", ex.location, ex.example_id)
        if self.template == "chat":
            if self.eos in r:
                r = r[: r.index(self.eos) + 1]  # response ends at the end-of-turn token
            else:
                r = r + [self.eos]
        else:
            r = r + [self.eos]
        if len(r) <= 1:
            log.skip("empty_response", ex.location, ex.example_id)
            return None
        if not p:
            # The first response token would have no context to be predicted from.
            log.skip("empty_prompt", ex.location, ex.example_id)
            return None
        excess = len(p) + len(r) - self.max_len
        if excess > 0:
            keep_head = 1 if (self.bos is not None and p[0] == self.bos) else 0
            if self.overlong == "drop" or len(p) - keep_head - excess < 1:
                log.skip(
                    "too_long",
                    ex.location,
                    f"{ex.example_id}: {len(p) + len(r)} tokens > {self.max_len}"
                    + (" (the response alone does not fit)" if self.overlong != "drop" else ""),
                )
                return None
            p = p[:keep_head] + p[keep_head + excess :]
            log.warn("truncated_prompt", ex.location, f"{ex.example_id}: {excess} tokens cut")
        ids = np.asarray(p + r, np.int32)
        mask = np.zeros(len(ids), np.uint8)
        mask[len(p) :] = 1
        if not self.eos_in_loss:
            mask[-1] = 0  # every template ends the sequence with the EOS (end-of-turn) token
        return Encoded(ex.example_id, ids, mask)
