"""The public extension API: preference objectives, selection scores and model families that a
user's own module adds, then names on the command line (`davir --plugins my_ext.py ...`).

    # my_ext.py (anywhere; nothing in davir_jax is edited)
    import jax
    from davir_jax.plugins import register_objective, register_score

    @register_objective("dpo_margin", default_beta=0.1)
    def dpo_margin(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing=0.0, margin=1.0):
        rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
        return -jax.nn.log_sigmoid(rc - rr - margin), rc, rr

    davir dpo --plugins my_ext.py --objective dpo_margin --model SFT --data pairs.jsonl --out DIR

The registries are the ones the built-ins live in (the built-in objectives and scores are
registered with these same decorators), so a plugin's name is accepted wherever a built-in one
is: `dpo.objective` / `--objective`, `davir select --method`, `pipeline.methods`, and the
config's validation, which runs after the plugins are loaded.

**Objective** (`register_objective(name, default_beta, *, needs_reference=True)`): a pure JAX
function of per-pair arrays, all `[P]` (or `[B, P]`) float32:

    fn(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing) -> (loss, reward_c, reward_r)

`pi_*`: summed log-probs of the chosen (c) and rejected (r) responses under the policy;
`ref_*`: the same under the frozen reference; `n_*`: their response-token counts (>= 1, EOS
included when it is in the loss); `beta`: `dpo.beta`, or `default_beta` when unset;
`label_smoothing`: `dpo.label_smoothing`; keyword parameters after it (with defaults) are the
objective's options, set by `dpo.objective_args`. It returns the per-pair loss (training
minimises its mean over the pairs of a step) and the per-pair rewards logged as rewards/chosen and
rewards/rejected (their difference gives rewards/margins, the accuracy and the held-out margin
statistics). It runs inside `jax.jit` and under `jax.grad`: no Python branching on values.
With `needs_reference=False` the reference log-probs are never computed and `ref_*` are 0.

**Score** (`register_score(name, fn)` or `@register_score(name)`): `fn(cols, seed) -> [N]`
float64, higher = selected first; `cols` is a `davir_jax.core.scores.ScoreColumns` of the scoring
job's per-example columns (`example_id`, `nll_base`, `nll_ref` summed over the response, and
`n_tokens`), validated (finite, non-negative NLLs, T >= 1) before any score sees them.

**Model family** (`register_family(model_type, from_hf)`): the decoder is one implementation
configured by `ArchConfig` (families llama, mistral, qwen2, gemma, gemma2). A plugin family is
an HF `config.json` `model_type` whose model is one of those decoders: `from_hf(config_dict)`
returns the `ArchConfig` (e.g. `ArchConfig.from_hf({**d, "model_type": "llama"})`), and the
safetensors weights are read with that family's HF tensor names. It applies to HF directories
(`load_model`, `davir info`, every job's model source); GGUF files and new layer arithmetic
(another norm, attention or MLP) need changes in `davir_jax/models`.

**Loading** (`load_plugins(specs)`): a spec ending in `.py` or containing a path separator is a
file, imported from its path under a module name of its own; anything else is an importable
module name. Loading a spec again is a no-op. Every error names the spec: a missing file, an
import error (with its message), a name that is already registered; a failed plugin leaves no
entry behind. The CLI loads `--plugins A[,B]` (before or after the subcommand), then
`DAVIR_PLUGINS=A[,B]`, then a config's top-level `plugins: [..]` (paths relative to that
YAML file), always before the config is validated.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from davir_jax.core.errors import UserError
from davir_jax.core.losses import PREFERENCE_OBJECTIVES, REFERENCE_FREE, ObjectiveFn
from davir_jax.core.losses import register_objective as _register_objective
from davir_jax.core.scores import SCORES, ScoreColumns, ScoreFn
from davir_jax.core.scores import register_score as _register_score
from davir_jax.models.arch import FAMILIES, HF_CONVERTERS, ArchConfig, register_hf_converter

# Environment variable with comma-separated plugin specs (read by the `davir` command).
ENV_VAR = "DAVIR_PLUGINS"

# spec as given -> its module, so that a spec named twice (flag, environment, config) loads once.
_LOADED: dict[str, ModuleType] = {}


class PluginError(UserError):
    """A plugin cannot be loaded; the message names its spec."""


def register_objective(
    name: str, default_beta: float, fn: ObjectiveFn | None = None, *, needs_reference: bool = True
) -> Any:
    """Add a preference objective (signature in the module docstring) under `name`. With `fn`,
    registers it and returns it; without, returns a decorator."""
    deco = _register_objective(name, default_beta, needs_reference=needs_reference)
    return deco if fn is None else deco(fn)


def register_score(name: str, fn: ScoreFn | None = None) -> Any:
    """Add a selection score `fn(cols: ScoreColumns, seed: int) -> float64 [N]` (higher =
    selected first) under `name`. With `fn`, registers it and returns it; without, a decorator."""
    deco = _register_score(name)
    return deco if fn is None else deco(fn)


def register_family(
    model_type: str, from_hf: Callable[[dict[str, Any]], ArchConfig] | None = None
) -> Any:
    """Read HF configs of `model_type` with `from_hf(config_dict) -> ArchConfig` (an
    `ArchConfig` of a built-in family; see the module docstring). With `from_hf`, registers it
    and returns it; without, a decorator."""
    deco = register_hf_converter(model_type)
    return deco if from_hf is None else deco(from_hf)


def split_specs(text: str | None) -> list[str]:
    """`A,B` (a flag's or the environment's value) as specs; blanks dropped."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _registries() -> tuple[dict[str, Any], ...]:
    return (PREFERENCE_OBJECTIVES, SCORES, HF_CONVERTERS)


def _import_file(spec: str) -> ModuleType:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PluginError(f"plugin {spec}: no such file ({path.resolve()})")
    path = path.resolve()
    # A module name of its own per file: two plugins called `ext.py` in different folders do
    # not replace each other in sys.modules (where a module must be while it runs: dataclasses
    # and typing look their module up there).
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    name = f"davir_plugin_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.spec_from_file_location(name, path)
    if found is None or found.loader is None:
        raise PluginError(f"plugin {spec}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin (a `.py` file or a module name) and return its module; see the module
    docstring. A failure raises `PluginError` naming `spec`, with the registries as before."""
    spec = spec.strip()
    if not spec:
        raise PluginError("plugin spec is empty")
    if spec in _LOADED:
        return _LOADED[spec]
    before = [dict(r) for r in _registries()]
    ref_free = set(REFERENCE_FREE)
    try:
        module = _import_file(spec) if _is_path(spec) else importlib.import_module(spec)
    except PluginError:
        raise
    except BaseException as e:
        # Undo what the plugin registered before it failed, so a retry or another plugin does
        # not meet half of it.
        for reg, old in zip(_registries(), before, strict=True):
            reg.clear()
            reg.update(old)
        REFERENCE_FREE.intersection_update(ref_free)
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        if missing and (spec == missing or spec.startswith(missing + ".")):
            raise PluginError(
                f"plugin {spec}: no module named {spec!r} (a file needs a path ending in .py)"
            ) from e
        raise PluginError(f"plugin {spec}: {type(e).__name__}: {e}") from e
    _LOADED[spec] = module
    return module


def load_plugins(specs: Iterable[str] | str | None) -> list[ModuleType]:
    """Load every spec of `specs` (a list, or one `A,B` string) in order; see `load_plugin`."""
    if specs is None:
        return []
    items = split_specs(specs) if isinstance(specs, str) else [s for s in specs if s.strip()]
    return [load_plugin(s) for s in items]


def registered() -> dict[str, list[str]]:
    """The names every registry holds now (built-ins and plugins)."""
    return {
        "objectives": list(PREFERENCE_OBJECTIVES),
        "scores": list(SCORES),
        "families": [*FAMILIES, *HF_CONVERTERS],
    }


__all__ = [
    "ENV_VAR",
    "ArchConfig",
    "PluginError",
    "ScoreColumns",
    "load_plugin",
    "load_plugins",
    "register_family",
    "register_objective",
    "register_score",
    "registered",
    "split_specs",
]
