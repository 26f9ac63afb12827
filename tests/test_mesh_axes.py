"""One rule resolves a `-1` mesh axis (config check, plan, mesh), and only the sharding module
names the mesh axes."""

from __future__ import annotations

import ast
import pathlib

import pytest

import davir_jax
from davir_jax.config import ConfigError, load_config
from davir_jax.core import sharding
from davir_jax.core.sharding import MESH_AXES, MeshConfig, make_mesh, resolve_axis_sizes
from davir_jax.jobs.plan import mesh_shape

pytestmark = pytest.mark.devices(8)
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "sizes,want",
    [
        ((1, -1, 1), (1, 8, 1)),
        ((-1, 1, 1), (8, 1, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((1, 2, -1), (1, 2, 4)),
        ((2, 2, 2), (2, 2, 2)),
    ],
)
def test_mesh_plan_and_rule_agree(sizes, want):
    expected = dict(zip(("data", "fsdp", "tensor"), want))  # written out: an independent oracle
    assert resolve_axis_sizes(*sizes, n_devices=8) == expected
    assert dict(make_mesh(*sizes).shape) == expected
    cfg = load_config(CONFIGS / "tiny.yaml", [f"--mesh.{k}={v}" for k, v in zip(MESH_AXES, sizes)])
    assert mesh_shape(cfg, 8) == expected
    # Without a device count (a plan for the fixed axes alone) the -1 axis is 1.
    assert mesh_shape(cfg, None) == {k: max(v, 1) for k, v in zip(MESH_AXES, sizes)}


@pytest.mark.parametrize(
    "sizes,key,match",
    [
        ((-1, -1, 1), "fsdp", "at most one mesh axis may be -1"),
        ((1, -1, -1), "tensor", "at most one mesh axis may be -1"),
        ((1, 0, 1), "fsdp", "must be a positive size or -1, got 0"),
        ((-3, 1, 1), "data", "must be a positive size or -1, got -3"),
    ],
)
def test_bad_sizes_are_refused_alike_everywhere(sizes, key, match):
    with pytest.raises(ValueError, match=rf"^mesh\.{key}: {match}"):
        resolve_axis_sizes(*sizes, n_devices=8)
    with pytest.raises(ValueError, match=rf"^mesh\.{key}: {match}"):
        make_mesh(*sizes)
    with pytest.raises(ValueError, match=rf"^{key}: {match}"):
        MeshConfig(*sizes)
    overrides = [f"--mesh.{k}={v}" for k, v in zip(MESH_AXES, sizes)]
    with pytest.raises(ConfigError, match=rf"mesh\.{key}: {match}"):
        load_config(CONFIGS / "tiny.yaml", overrides)


def test_devices_not_divisible_by_the_fixed_axes():
    with pytest.raises(ValueError, match="mesh: 8 devices are not divisible .* product 3"):
        resolve_axis_sizes(3, -1, 1, n_devices=8)
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh(3, -1, 1)


def test_only_the_sharding_module_names_mesh_axes():
    """No other module spells a mesh axis: no "fsdp"/"tensor" string, no `x.shape["data"]`, no
    PartitionSpec/NamedSharding built from an axis-name string."""
    home = pathlib.Path(sharding.__file__).resolve()
    found = []
    for path in sorted(pathlib.Path(davir_jax.__file__).parent.rglob("*.py")):
        if path.resolve() == home:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            axis_consts = []
            if isinstance(node, ast.Constant) and node.value in ("fsdp", "tensor"):
                axis_consts.append(node)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
                if node.value.attr == "shape" and isinstance(node.slice, ast.Constant):
                    if node.slice.value in MESH_AXES:
                        axis_consts.append(node)
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("P", "PartitionSpec", "NamedSharding"):
                    axis_consts += [
                        a
                        for a in ast.walk(node)
                        if isinstance(a, ast.Constant) and a.value in MESH_AXES
                    ]
            found += [f"{path.name}:{c.lineno}" for c in axis_consts]
    assert found == []
