"""The one config schema (frozen dataclasses), YAML loading and dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", overrides=["--mesh.fsdp=4", "--model.dtype=bfloat16"])

A YAML file may name a `base:` file (relative to itself) whose values it overrides. Unknown keys,
wrong types and impossible values raise `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from davir_jax.errors import UserError
from davir_jax.models.arch import ArchConfig, RopeScaling
from davir_jax.sharding import resolve_axis_sizes

T = TypeVar("T")


class ConfigError(UserError):
    """A config key is unknown, mistyped or impossible; the message names the key and file."""


def shorthand(default: Any, flag: str, *commands: str) -> Any:
    """A field that `commands` also take as the short flag `flag` (`davir_jax.cli_schema` makes
    the option from this; a bool field's flag is a switch that sets it true, and one switch may
    set several fields)."""
    return dataclasses.field(default=default, metadata={"cli": {flag: commands}})


# The commands that read a model and a data file: their short flags for the data keys.
_READERS = ("score", "sft", "dpo", "eval")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model, in which precision.

    `source`: a `load_model` source (registered name, GGUF file, HF or davir-jax directory).
    `arch`: an explicit architecture instead of a source (random init; shape planning).
    """

    source: str | None = shorthand("smollm2-135m", "--model", "sft", "dpo", "eval")
    arch: ArchConfig | None = None
    dtype: str = "float32"  # parameter dtype (master weights)
    compute_dtype: str | None = None  # the dtype computations run in (None: same as dtype)
    # Rematerialise each layer under a gradient (training only; scoring is unaffected): the
    # backward keeps each layer's input, not its activations (SmolLM2 SFT at 8x1024: peak RSS
    # 5.1 GB; benchmarks/RESULTS.md).
    remat: bool = True
    attn_block: int = 64  # models.decoder.ATTN_BLOCK: blocked attention; 0: dense
    # Run the layers as one lax.scan (compile time independent of depth); the same parameters,
    # checkpoints and results as the unrolled loop.
    scan_layers: bool = True

    def __post_init__(self) -> None:
        if self.attn_block < 0:
            raise ValueError(
                f"attn_block: must be 0 (dense) or a block size, got {self.attn_block}"
            )
        for name in ("dtype", "compute_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}: {v!r} is not float32, bfloat16 or float16")
        if self.source is None and self.arch is None:
            raise ValueError("source: one of model.source or model.arch must be set")

    def run_options(self) -> dict[str, Any]:
        """How to run the model (`load_model`/`random_model` keywords), besides `dtype`."""
        return {
            "compute_dtype": self.compute_dtype,
            "remat": self.remat,
            "attn_block": self.attn_block,
            "scan_layers": self.scan_layers,
        }


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (filled from the device count).

    `chip` names the accelerator for `davir plan` (v5e, v5p, v4, h100, h200, a100); it does not
    change how a job runs. `cpu_devices` splits the host CPU into that many JAX devices when JAX
    runs on CPU (-1: one per logical CPU; 0: as JAX starts, one device unless set elsewhere);
    with `data=-1, fsdp=1` the batch is split over them (`configs/mesh/cpu.yaml`; the default
    `fsdp=-1` shards the weights instead, slower for small models). See
    `sharding.use_cpu_devices`. `compile_cache`: a directory for XLA's compiled programs (JAX's
    persistent compilation cache), so that the identical steps of a pipeline's stages and of
    reruns compile once (`sharding.use_compile_cache`); None leaves JAX's own setting.
    """

    data: int = 1  # data-parallel axis size
    fsdp: int = -1  # parameter-sharding axis size
    tensor: int = 1  # tensor-parallel axis size
    chip: str | None = None
    cpu_devices: int = 0
    compile_cache: str | None = None

    def __post_init__(self) -> None:
        # The one -1 rule; errors start with the axis name, which the loader turns into the key.
        resolve_axis_sizes(self.data, self.fsdp, self.tensor, where="")
        if self.cpu_devices < -1:
            raise ValueError(f"cpu_devices: must be >= -1, got {self.cpu_devices}")


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


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """The DavIR scoring job (`davir score`): two models, one pass, resumable output.

    `base`, `reference`: any `load_model` source (dtype and mesh from the model and mesh sections).
    `tokenizer`: where the tokens come from (default: the base source's tokenizer).
    `resident`: `both` (both models in memory, each batch through both) or `sequential` (base
    over all batches, then reference; for when both do not fit).
    `shard_batches`: batches per output shard (the unit of resumption).
    `chunk`: response positions per row in one LM-head application (`losses.LM_HEAD_CHUNK`);
    peak logits memory = rows * chunk * 4096 floats (`losses.VOCAB_BLOCK`; the whole vocabulary
    where it is split over devices).
    """

    base: str | None = shorthand(None, "--base", "score")
    reference: str | None = shorthand(None, "--reference", "score")
    tokenizer: str | None = None
    out: str | None = shorthand(None, "--out", "score")  # output directory
    resident: str = "both"
    shard_batches: int = 16
    chunk: int = 32  # losses.LM_HEAD_CHUNK
    overwrite: bool = shorthand(False, "--overwrite", "score")  # discard another run's outputs
    diagnostics: bool = True  # write the length-correlation diagnostics after scoring

    def __post_init__(self) -> None:
        if self.resident not in ("both", "sequential"):
            raise ValueError(f"resident: {self.resident!r} is not both or sequential")
        for k in ("shard_batches", "chunk"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}: must be positive, got {getattr(self, k)}")


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


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference training (`davir dpo`) on `data.path` (a preference format), from `model.source`.

    `objective`: dpo | ipo | dpo_norm | davir_dpo, or a plugin's (`davir_jax.plugins`);
    `beta`: None takes the objective's documented default. The reference log-probs are
    precomputed once (`reference`, default the starting model) and read from the batch, or taken
    from a `davir score` run on the same pairs (`reference_scores`); `reference_in_step` computes
    them inside the step instead (reference model resident). `eval_fraction` of the pairs (chosen
    by a hash of their id) is held out for the end-of-training preference accuracy and the
    margin-length correlation.
    """

    objective: str = shorthand("davir_dpo", "--objective", "dpo")
    beta: float | None = shorthand(None, "--beta", "dpo")
    label_smoothing: float = 0.0  # conservative DPO: the share of pairs assumed mislabelled
    # The reference model's source (default: the starting model).
    reference: str | None = shorthand(None, "--reference", "dpo")
    # A davir score run on the same pairs, whose nll_ref column gives the reference log-probs.
    reference_scores: str | None = shorthand(None, "--reference-scores", "dpo")
    reference_in_step: bool = False
    eval_fraction: float = 0.05

    def __post_init__(self) -> None:
        from davir_jax.losses import PREFERENCE_OBJECTIVES

        if self.objective not in PREFERENCE_OBJECTIVES:
            raise ValueError(
                f"objective: {self.objective!r} is not one of {', '.join(PREFERENCE_OBJECTIVES)} "
                "(a plugin's objective needs --plugins FILE or the config's plugins key)"
            )
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")

    @property
    def resolved_beta(self) -> float:
        from davir_jax.losses import PREFERENCE_OBJECTIVES

        return self.beta if self.beta is not None else PREFERENCE_OBJECTIVES[self.objective][1]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`davir eval`: held-out loss on `data.path`, and answers generated for `generate` examples.

    `answer`: how a generation is checked against the reference response: `gsm8k` (the number
    after ####, compared numerically), `exact` (normalised string equality) or `auto` (gsm8k for
    the gsm8k format, else exact). `generate: 0` skips generation.
    """

    out: str | None = shorthand(None, "--out", "eval")  # writes eval.json, generations.jsonl
    generate: int | None = shorthand(0, "--generate", "eval")  # answers for N examples (None: all)
    max_new_tokens: int = shorthand(256, "--max-new-tokens", "eval")  # per generated answer
    temperature: float = 0.0  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling's probability mass
    batch_size: int = 16  # prompts generated at once
    answer: str = "auto"

    def __post_init__(self) -> None:
        if self.answer not in ("auto", "gsm8k", "exact"):
            raise ValueError(f"answer: {self.answer!r} is not auto, gsm8k or exact")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature: must be >= 0 (and top_p in (0, 1])")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole DavIR experiment (`davir pipeline`, `davir demo`), in `out`:

    1. SFT `model.source` on the pool (`data.path`) -> the reference (or use `reference`);
    2. score the pool with base and reference; 3. select with every method of `methods` at
    every budget of `budgets` (`all`, `count=N`, `fraction=F`); `extra_pools` (files) join every
    selection whole (the paper's Alpaca + GSM8K mixture); 4. SFT the base on each selection;
    5. evaluate the base, the reference (= SFT on the full pool, when `full`) and every subset
    model on `test` (held-out loss, and exact-match accuracy on `generate` examples);
    6. write `report.md`. Each stage is skipped when its outputs exist with the same inputs.

    `val`: a split of the pool kept out of the reference's training; the reference's recipe
    (its epoch, `train.val`/`train.keep_best`/`train.patience`) is chosen by the loss on it,
    never by how the subsets turn out. `seeds`: every selection, subset SFT and evaluation is
    repeated with seeds `seed`, `seed + 1`, ... (random draws another subset; every method's
    SFT another data order); the report gives mean, spread and paired intervals over them.
    `labels`: fields of the pool's rows (e.g. `task`, `quality`) that the report uses to
    describe scores and selections; no selection method reads them.
    """

    out: str | None = shorthand(None, "--out", "pipeline", "demo")  # the run folder
    test: str | None = shorthand(None, "--test", "pipeline", "demo")  # held-out data file
    val: str | None = None
    reference: str | None = None  # a reference model source (default: SFT on the pool)
    methods: tuple[str, ...] = ("davir", "rho", "random")  # selection scores
    budgets: tuple[str, ...] = ("fraction=0.25",)  # all, count=N or fraction=F
    extra_pools: tuple[str, ...] = ()  # data files joining every selection whole
    full: bool = True  # evaluate the reference too (SFT on the full pool)
    generate: int = 64  # test examples answered by generation (exact-match accuracy)
    seeds: int = 3
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: at least one selection method")
        if self.seeds < 1:
            raise ValueError(f"seeds: must be positive, got {self.seeds}")
        from davir_jax.scores import SCORES
        from davir_jax.selection import Budget

        unknown = [m for m in self.methods if m not in SCORES]
        if unknown:
            # Here, not after the reference SFT and the scoring pass that precede selection.
            raise ValueError(
                f"methods: {unknown} not among the scores {', '.join(SCORES)} (a plugin's "
                "score needs --plugins FILE or the config's plugins key)"
            )

        for b in self.budgets:
            Budget.parse(b)


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run. Sections for optimizer, training and DPO join here.

    `plugins`: `davir_jax.plugins` specs (`.py` files, relative to the YAML file that names
    them, or module names); `load_config` loads them before it validates any section, so their
    objectives and scores are valid values of `dpo.objective` and `pipeline.methods`.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    scoring: ScoringConfig = dataclasses.field(default_factory=ScoringConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    seed: int = 0  # initialisation, data order, random selection and sampling derive from it
    plugins: tuple[str, ...] = ()  # plugin files or modules, loaded before the rest is built


# -- building typed dataclasses from plain data ---------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (recursing into dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(value, options[0], key)
        for a in options:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{key}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-3" (no dot) as a string; a researcher means the number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a dict; unknown keys and bad values name the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (known in {prefix or 'the top level'}: "
            f"{', '.join(fields)})"
        )
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # Validation in __post_init__ starts its message with the field name.
        msg = str(e)
        field = msg.split(":", 1)[0] if ":" in msg else ""
        key = f"{prefix}.{field}" if prefix and field in fields else (prefix or field)
        raise ConfigError(
            f"{key}: {msg.split(':', 1)[1].strip() if field in fields else msg}"
        ) from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (for manifests and YAML dumps)."""
    return dataclasses.asdict(cfg)


# -- files and overrides ----------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its `base:` chain resolved (safe_load only)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base: cycle through {[str(p) for p in _seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    plugins = data.get("plugins")
    if isinstance(plugins, list):
        # A plugin file is found next to the config that names it, as `base:` is.
        data["plugins"] = [
            str(path.parent / p) if isinstance(p, str) and _is_relative_file(p) else p
            for p in plugins
        ]
    if base is not None:
        data = _deep_merge(read_yaml(path.parent / base, _seen + (path,)), data)
    return data


def _is_relative_file(spec: str) -> bool:
    """Whether a plugin spec is a relative path to a file (not a module name)."""
    return (spec.endswith(".py") or "/" in spec) and not Path(spec).expanduser().is_absolute()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`--a.b=v` / `a.b=v` strings into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r}: expected --key.path=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            # e.g. --data.fields={a: (an unclosed flow mapping): name the key and the value.
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: {key}: the value {raw!r} is not valid YAML ({problem})"
            ) from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type[T] = Config
) -> T:
    """Load a YAML config (or the defaults) and apply dotted overrides; errors name the file."""
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "<defaults>"
    try:
        if overrides:
            data = _deep_merge(data, parse_overrides(overrides))
            where += " + command-line overrides"
        if "plugins" in data and cls is Config:
            _load_plugins(data["plugins"])
        return build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _load_plugins(value: Any) -> None:
    """Load the config's `plugins` before any section is built: `dpo.objective` and
    `pipeline.methods` are checked against the registries when their section is built."""
    from davir_jax.plugins import PluginError, load_plugins  # imports jax: only when named

    specs = _coerce(value, tuple[str, ...], "plugins")
    try:
        load_plugins(specs)
    except PluginError as e:
        raise ConfigError(f"plugins: {e}") from e


__all__ = [
    "ArchConfig",
    "Config",
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "EvalConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "RopeScaling",
    "ScoringConfig",
    "TrainConfig",
    "build",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "shorthand",
    "to_dict",
]
