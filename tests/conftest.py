"""Suite-wide setup: 8 fake CPU devices (set once, before any backend starts) and offline HF."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    n = len(jax.devices())
    for item in items:
        m = item.get_closest_marker("devices")
        if m and n < m.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {m.args[0]} devices, {n} present"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (tests read ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random transformers Llama saved with the BOS-adding word tokenizer: a model
    source that trains, scores and generates in seconds."""
    from hf_models import make_hf_model
    from toy_tokenizers import word_tokenizer

    d = tmp_path_factory.mktemp("base")
    make_hf_model("llama", d, seed=0)
    word_tokenizer(True).save_pretrained(d)
    return d


def run_cli(command: str, args: list[str], env_extra: dict[str, str] | None = None):
    """`python -m davir_jax.cli COMMAND ARGS` in a fresh process (one CPU device), for kill and
    resume tests; returns the Popen."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "davir_jax.cli", command, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny HF Llama models (base, reference) with the BOS-adding word tokenizer saved in."""
    from hf_models import make_hf_model
    from toy_tokenizers import word_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = word_tokenizer(True)
    out = {}
    for name, seed in (("base", 0), ("reference", 1)):
        d = root / name
        out[name] = make_hf_model("llama", d, seed=seed)
        tok.save_pretrained(d)
    return root, out, tok
