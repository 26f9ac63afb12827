"""The config schema: every shipped YAML loads; bad keys, types and values name key and file."""

from __future__ import annotations

import pathlib

import pytest

from davir_jax.config import Config, load_config
from davir_jax.core.schema import ConfigError, parse_overrides

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def _write(tmp_path, text: str) -> pathlib.Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "mesh:\n  fsdpp: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*mesh\.fsdpp"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, "mesh:\n  tensor: two\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*mesh\.tensor.*integer"):
        load_config(p)


def test_heads_not_divisible_by_kv_heads(tmp_path):
    p = _write(tmp_path, "model:\n  source: null\n  arch:\n    num_heads: 6\n    num_kv_heads: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*model\.arch\.num_kv_heads.*divisible"):
        load_config(p)


def test_cpu_devices_below_minus_one(tmp_path):
    p = _write(tmp_path, "mesh:\n  cpu_devices: -2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*mesh\.cpu_devices.*>= -1"):
        load_config(p)


def test_two_minus_one_mesh_axes(tmp_path):
    p = _write(tmp_path, "mesh:\n  data: -1\n  fsdp: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*mesh.*at most one"):
        load_config(p)


def test_dotted_overrides_and_their_errors(tmp_path):
    cfg = load_config(
        CONFIGS / "tiny.yaml", ["--mesh.fsdp=4", "--mesh.tensor=2", "--model.dtype=bfloat16"]
    )
    assert (cfg.mesh.fsdp, cfg.mesh.tensor, cfg.model.dtype) == (4, 2, "bfloat16")
    assert cfg.model.arch.num_layers == 2  # untouched keys survive
    with pytest.raises(ConfigError, match=r"overrides.*unknown key model\.arch\.nope"):
        load_config(CONFIGS / "tiny.yaml", ["--model.arch.nope=1"])
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(None, ["--model.dtype=float8"])
    assert parse_overrides(["--a.b=[1, 2]", "c=x"]) == {"a": {"b": [1, 2]}, "c": "x"}


def test_base_chain_and_frozen(tmp_path):
    (tmp_path / "base.yaml").write_text("mesh:\n  data: 2\n  fsdp: 4\n")
    p = _write(tmp_path, "base: base.yaml\nmesh:\n  fsdp: -1\n")
    cfg = load_config(p)
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, -1)
    with pytest.raises(AttributeError):
        cfg.mesh.data = 3  # type: ignore[misc]


def test_yaml_is_safe_loaded(tmp_path):
    p = _write(tmp_path, "seed: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_config_defaults_equal_the_code_defaults():
    """config.py stays free of jax: its copies of the run defaults must equal the code's."""
    from davir_jax.config import ScoringConfig
    from davir_jax.core.losses import LM_HEAD_CHUNK
    from davir_jax.engine.config import TrainConfig
    from davir_jax.models.config import ModelConfig
    from davir_jax.models.decoder import ATTN_BLOCK

    assert ModelConfig().attn_block == ATTN_BLOCK
    assert ScoringConfig().chunk == TrainConfig().chunk == LM_HEAD_CHUNK
