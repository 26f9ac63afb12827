"""The one config schema (frozen dataclasses), YAML loading and dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", overrides=["--mesh.fsdp=4", "--model.dtype=bfloat16"])

A YAML file may name a `base:` file (relative to itself) whose values it overrides. Unknown keys,
wrong types and impossible values raise `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

from davir_jax.core.schema import (
    ConfigError,
    T,
    _coerce,
    _deep_merge,
    build,
    parse_overrides,
    read_yaml,
    shorthand,
)
from davir_jax.core.sharding import MeshConfig
from davir_jax.data.config import DataConfig
from davir_jax.engine.config import OptimizerConfig, TrainConfig
from davir_jax.models.config import ModelConfig


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
    `proxy`: a third model source, scored with and without the prompt (Superfiltering's small
    proxy, arXiv 2402.00530); it must take the scoring tokenizer's ids (a smaller model of the
    same family), so every score compares the same token ids.
    `ifd`: models (`base`, `reference`) whose NLL of the response alone (without its prompt,
    `data.dataset.ResponseAlone`) is also computed, for the IFD scores (arXiv 2308.12032).
    `embed`: a scored model (`base`, `reference`, `proxy`) whose final hidden states,
    mean-pooled over each response, are stored as `embeddings.npy` beside the scores (for
    `davir select --diversity`), from the same forward pass.
    At least one of `base`, `reference`, `proxy` is needed.
    """

    base: str | None = shorthand(None, "--base", "score")
    reference: str | None = shorthand(None, "--reference", "score")
    proxy: str | None = shorthand(None, "--proxy", "score")
    ifd: tuple[str, ...] = ()
    embed: str | None = None
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
        for m in self.ifd:
            if m not in ("base", "reference", "proxy"):
                raise ValueError(f"ifd: {m!r} is not base, reference or proxy")
        if self.embed not in (None, "base", "reference", "proxy"):
            raise ValueError(f"embed: {self.embed!r} is not base, reference or proxy")
        for k in ("shard_batches", "chunk"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}: must be positive, got {getattr(self, k)}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference training (`davir dpo`) on `data.path` (a preference format), from `model.source`.

    `objective`: dpo | ipo | dpo_norm | davir_dpo | simpo | orpo | hinge | robust, or a
    plugin's (`davir_jax.plugins`);
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
    # Adds nll_weight x the chosen response's mean token NLL to any objective's pair loss (RPO,
    # Pang et al. 2024, arXiv 2404.19733); logged as nll_loss.
    nll_weight: float = 0.0
    # The objective's own keyword options, e.g. {gamma_beta_ratio: 0.5} for simpo.
    objective_args: dict[str, float] = dataclasses.field(default_factory=dict)
    # The reference model's source (default: the starting model).
    reference: str | None = shorthand(None, "--reference", "dpo")
    # A davir score run on the same pairs, whose nll_ref column gives the reference log-probs.
    reference_scores: str | None = shorthand(None, "--reference-scores", "dpo")
    reference_in_step: bool = False
    eval_fraction: float = 0.05

    def __post_init__(self) -> None:
        from davir_jax.core.losses import PREFERENCE_OBJECTIVES

        if self.objective not in PREFERENCE_OBJECTIVES:
            raise ValueError(
                f"objective: {self.objective!r} is not one of {', '.join(PREFERENCE_OBJECTIVES)} "
                "(a plugin's objective needs --plugins FILE or the config's plugins key)"
            )
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight: must be 0 or more, got {self.nll_weight}")
        fn = PREFERENCE_OBJECTIVES[self.objective][0]
        known = list(inspect.signature(fn).parameters)[8:]  # after the 8 shared arguments
        for k in self.objective_args:
            if k not in known:
                raise ValueError(
                    f"objective_args.{k}: {self.objective} takes {', '.join(known) or 'no options'}"
                )
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")

    @property
    def resolved_beta(self) -> float:
        from davir_jax.core.losses import PREFERENCE_OBJECTIVES

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
    # selection methods: a score, or LABEL=SCORE;filter=EXPR;diversity=STEP (SelectionMethod)
    methods: tuple[str, ...] = ("davir", "rho", "random")
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
        from davir_jax.core.selection import Budget, SelectionMethod

        # Here, not after the reference SFT and the scoring pass that precede selection.
        labels = []
        for m in self.methods:
            try:
                labels.append(SelectionMethod.parse(m).label)
            except ValueError as e:
                raise ValueError(f"methods: {e}") from None
        if len(set(labels)) != len(labels):
            raise ValueError(f"methods: labels must differ, got {labels}")

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


# -- files and overrides ----------------------------------------------------------------------


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
    "Config",
    "DPOConfig",
    "EvalConfig",
    "PipelineConfig",
    "ScoringConfig",
    "load_config",
]
