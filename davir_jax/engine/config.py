"""The `optimizer` and `train` sections of the config: what the trainer runs."""

from __future__ import annotations

import dataclasses

from davir_jax.core.schema import shorthand


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """optax AdamW. Defaults: the Stanford Alpaca recipe (lr 2e-5, cosine, 3% warm-up, no weight
    decay) with HF Trainer's gradient clipping at 1.0; method.md documents why.

    `schedule`: cosine | linear | constant (after warm-up). `warmup_steps` overrides
    `warmup_ratio` (a fraction of all steps). Weight decay skips norms and biases unless
    `decay_norms_and_biases`.
    """

    lr: float = 2e-5  # peak learning rate
    schedule: str = "cosine"
    warmup_ratio: float = 0.03  # warm-up steps, as a fraction of all steps
    warmup_steps: int | None = None  # warm-up steps (overrides warmup_ratio)
    end_lr_ratio: float = 0.0  # the final learning rate, as a fraction of lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    decay_norms_and_biases: bool = False  # weight decay on norm scales and biases too
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    clip_norm: float | None = 1.0  # global gradient-norm clipping (None: none)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule: {self.schedule!r} is not cosine, linear or constant")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The SFT loop (`davir sft`) and the DPO loop (`davir dpo`).

    The batch of one optimizer step, as researchers state it: `batch_examples` (the Alpaca
    recipe's 128; pairs for DPO) or `batch_tokens` (whole examples, as close to that many tokens
    as they allow; an example counts all its tokens, a pair both responses). The step's examples
    are packed into rows of `data.row_len`, split into micro-batches of `data.batch_rows` rows;
    the micro-batch count is derived (the most any step of the run needs; shorter steps get
    empty, zero-weight micro-batches, so shapes never change). Unset: one step is `grad_accum`
    batches of `data.batch_rows` packed rows. The loss is the mean over all response tokens
    of the whole step either way. `selection`: a `davir select` output directory (or its
    manifest.json) to train on instead of `data.path`.

    A run of fewer than `min_steps` optimizer steps is reported before it starts (an error
    with `strict_steps`, set by the CLI's --strict). `val`: a data file (read with the data
    settings) whose response loss is measured after every epoch (DIR/val.json); `keep_best`
    exports the epoch with the lowest one, and `patience` stops after that many epochs without
    improvement (None: never).
    """

    out: str | None = shorthand(None, "--out", "sft", "dpo")  # output directory
    selection: str | None = shorthand(None, "--selection", "sft")
    epochs: int = 3  # passes over the data
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    grad_accum: int = 1  # batches of data.batch_rows rows per step, when no batch key is set
    batch_examples: int | None = None  # examples (DPO: pairs) per optimizer step
    batch_tokens: int | None = None  # tokens of whole examples per optimizer step
    min_steps: int = 20  # a run of fewer optimizer steps is reported before it starts
    # A run of fewer than min_steps optimizer steps is an error, not a warning.
    strict_steps: bool = shorthand(False, "--strict", "sft", "dpo", "pipeline")
    val: str | None = None
    keep_best: bool = True  # export the epoch of the lowest val loss (else the last)
    patience: int | None = 1  # epochs without a lower val loss before stopping (None: never)
    checkpoint_every: int = 100  # optimizer steps between checkpoints
    keep_checkpoints: int = 3  # the newest checkpoints kept
    log_every: int = 1  # optimizer steps between metrics lines
    chunk: int = 32  # response positions per row in one LM-head application (LM_HEAD_CHUNK)
    overwrite: bool = shorthand(False, "--overwrite", "sft", "dpo")  # discard another run's outputs

    def __post_init__(self) -> None:
        for k in ("epochs", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}: must be positive, got {getattr(self, k)}")
        for k in ("batch_examples", "batch_tokens", "patience", "max_steps"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"{k}: must be positive (or unset), got {v}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps: must be >= 0, got {self.min_steps}")
        if self.batch_examples is not None and self.batch_tokens is not None:
            raise ValueError(
                f"batch_tokens: set batch_examples ({self.batch_examples}) or batch_tokens "
                f"({self.batch_tokens}), not both"
            )
        if self.grad_accum != 1 and (self.batch_examples or self.batch_tokens):
            # An error, not a silent override: the step is sized by the batch key alone.
            which = "batch_examples" if self.batch_examples else "batch_tokens"
            raise ValueError(
                f"grad_accum: {self.grad_accum} with train.{which}: the micro-batches per step "
                f"follow from {which} and data.batch_rows; leave grad_accum at 1"
            )

    @property
    def sized_batch(self) -> bool:
        """Whether a step is sized in examples or tokens (not in rows)."""
        return self.batch_examples is not None or self.batch_tokens is not None
