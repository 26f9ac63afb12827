"""The `data` section of the config: a data file, how to read and tokenize it, how to batch it."""

from __future__ import annotations

import dataclasses

from davir_jax.core.schema import shorthand

# The commands that read a model and a data file: their short flags for the data keys.
_READERS = ("score", "sft", "dpo", "eval")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A data file, how to read and tokenize it, and how to batch it.

    `format`: auto, prompt_response, alpaca, gsm8k, chat, preference, hh_rlhf, gsm8k_solutions.
    `fields`: renames a format's logical fields (e.g. {prompt: question}) for other layouts.
    `template`: plain, alpaca or chat (see `davir_jax.data.templates`).
    `overlong`: drop, or truncate_left (cut the prompt from the left; the response never).
    `strict`: any skipped row is an error instead of a counted skip.
    `pack`: several examples per row (`row_len`, at most `max_segments`), else length buckets.
    `batch_rows`: rows per global batch (split over processes and data-parallel devices).
    `eos_in_loss`: whether the EOS (end-of-turn) token that ends every response counts as a
    response token in the loss mask, i.e. in every loss (SFT, DPO, eval) and in the scores' NLLs
    and T. Default true: training must see the EOS to learn to stop, as HF/Stanford Alpaca SFT
    does. False keeps the EOS in the ids (the sequence is unchanged) with loss weight 0, e.g. to
    score without it: one token's loss weighs most on short responses
    (benchmarks/eos_length_ablation.py measures what it changes). Part of the token cache key,
    so of every run's identity.
    """

    path: str | None = shorthand(None, "--data", *_READERS, "pipeline", "demo")  # the data file
    format: str = shorthand("auto", "--format", *_READERS)
    name: str | None = None  # the data set's name in manifests (default: from the file name)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    template: str = shorthand("plain", "--template", *_READERS)
    max_len: int = shorthand(1024, "--max-len", *_READERS)  # tokens per example (pairs: each)
    overlong: str = "drop"
    strict: bool = shorthand(False, "--strict", "score", "sft", "dpo", "pipeline")
    cache_dir: str = "runs/cache"  # the token cache (shared by runs on the same data)
    pack: bool = True
    row_len: int | None = None  # tokens per packed row (None: max_len)
    max_segments: int = 16  # examples per packed row, at most
    bucket_min: int = 64  # the shortest length bucket (without packing)
    batch_rows: int = 8
    eos_in_loss: bool = True

    def __post_init__(self) -> None:
        from davir_jax.data.readers import FORMATS
        from davir_jax.data.templates import OVERLONG, TEMPLATES

        if self.format not in ("auto",) + FORMATS:
            raise ValueError(f"format: {self.format!r} is not auto or one of {', '.join(FORMATS)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template: {self.template!r} is not one of {', '.join(TEMPLATES)}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong: {self.overlong!r} is not one of {', '.join(OVERLONG)}")
        for k in ("max_len", "max_segments", "bucket_min", "batch_rows"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}: must be positive, got {getattr(self, k)}")
        if self.row_len is not None and self.row_len < self.max_len:
            raise ValueError(f"row_len: {self.row_len} is shorter than max_len {self.max_len}")

    @property
    def packed_row_len(self) -> int:
        return self.row_len or self.max_len
