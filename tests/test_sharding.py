"""Real sharding on 8 fake CPU devices: rules table, born-sharded params, 8-device == 1-device."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from hf_models import make_hf_model
from jax.sharding import PartitionSpec as P

from davir_jax.core.sharding import (
    LOGICAL_RULES,
    MeshConfig,
    logical_to_spec,
    make_mesh,
    mesh_from_config,
    use_cpu_devices,
)
from davir_jax.models import ArchConfig, load_model, random_model
from davir_jax.models.weights import iter_params

pytestmark = pytest.mark.devices(8)


def test_rules_table_names_each_logical_axis_once():
    names = [k for k, _ in LOGICAL_RULES]
    assert len(names) == len(set(names))
    assert set(names) == {
        "batch",
        "seq",
        "embed",
        "mlp",
        "heads",
        "kv_heads",
        "head_dim",
        "vocab",
        "lora_rank",
    }


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
    assert dict(make_mesh(1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(3, 1, 1)


def test_cpu_devices_once_jax_has_started():
    use_cpu_devices(0)  # leave it as it is: nothing to do
    use_cpu_devices(8)  # what this process already has: a no-op
    with pytest.raises(ValueError, match=r"mesh\.cpu_devices.*2 CPU devices.*already 8"):
        use_cpu_devices(2)
    mesh = mesh_from_config(MeshConfig(data=-1, fsdp=1, cpu_devices=8))
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}


CPU_DEVICES = """
import sys, jax
from davir_jax.core.sharding import use_cpu_devices
case, n = sys.argv[1], int(sys.argv[2])
if case == "started":
    jax.devices()  # the backends start with JAX's default, one CPU device
    use_cpu_devices(1)  # what it has: fine
elif case == "set":
    jax.config.update("jax_num_cpu_devices", 4)  # as DAVIR_DISTRIBUTED=local does
try:
    use_cpu_devices(n)
except ValueError as e:
    print("ValueError:", e)
print(len(jax.devices("cpu")))
"""


def _cpu_devices_in_a_fresh_process(case: str, n: int) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    args = [sys.executable, "-c", CPU_DEVICES, case, str(n)]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cpu_devices_split_a_fresh_process():
    assert _cpu_devices_in_a_fresh_process("fresh", 3).split() == ["3"]
    if hasattr(os, "sched_getaffinity"):  # -1: one device per logical CPU it may run on
        out = _cpu_devices_in_a_fresh_process("fresh", -1)
        assert int(out.split()[-1]) == len(os.sched_getaffinity(0))


def test_cpu_devices_too_late_or_set_elsewhere_is_an_error():
    out = _cpu_devices_in_a_fresh_process("started", 3)
    assert "ValueError: mesh.cpu_devices: asks for 3 CPU devices" in out
    assert "already started with 1" in out and out.split()[-1] == "1"
    out = _cpu_devices_in_a_fresh_process("set", 2)
    assert "jax_num_cpu_devices is already 4" in out and out.split()[-1] == "4"


def test_every_parameter_follows_the_rules_table(tmp_path):
    make_hf_model("qwen2", tmp_path)  # q/k/v biases too
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = load_model(tmp_path, mesh=mesh)
    expected_spec = {
        "embed": P("tensor", "fsdp"),
        "q_proj": P("fsdp", "tensor", None),
        "k_proj": P("fsdp", "tensor", None),
        "v_proj": P("fsdp", "tensor", None),
        "o_proj": P("tensor", None, "fsdp"),
        "q_bias": P("tensor", None),
        "k_bias": P("tensor", None),
        "gate_proj": P("fsdp", "tensor"),
        "up_proj": P("fsdp", "tensor"),
        "down_proj": P("tensor", "fsdp"),
        "scale": P("fsdp"),
        "lm_head": P("fsdp", "tensor"),
    }
    axis_size = dict(mesh.shape)
    seen = set()
    for path, var in iter_params(model):
        arr = var.get_value()
        leaf = path.split(".")[-1]
        if leaf in expected_spec:
            seen.add(leaf)
            spec = arr.sharding.spec
            assert spec == expected_spec[leaf], path
            # The shard shape on each device follows from the spec.
            want = tuple(
                n // (axis_size[s] if isinstance(s, str) else 1)
                for n, s in zip(arr.shape, tuple(spec) + (None,) * (arr.ndim - len(spec)))
            )
            assert arr.addressable_shards[0].data.shape == want, path
            assert len(arr.sharding.device_set) == 8
    assert {"embed", "q_proj", "o_proj", "gate_proj", "down_proj", "scale", "lm_head"} <= seen


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fsdp4_tensor2_forward_equals_one_device(tmp_path, family):
    make_hf_model(family, tmp_path)
    single = load_model(tmp_path)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    sharded = load_model(tmp_path, mesh=mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, single.arch.vocab_size, (8, 12)).astype(np.int32)
    ref = np.asarray(single(ids))
    from davir_jax.core.sharding import batch_sharding

    ids_sharded = jax.device_put(ids, batch_sharding(mesh))
    out = jax.jit(lambda m, x: m(x))(sharded, ids_sharded)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5)


def test_random_init_is_born_sharded():
    arch = ArchConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
    )
    mesh = make_mesh(2, 2, 2)
    model = random_model(arch, mesh=mesh)
    q = model.layers[0].attn.q_proj.get_value()
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (16, 2, 8)


def test_indivisible_axes_are_replicated_not_failing():
    mesh = make_mesh(1, 4, 2)
    # SmolLM2-like: 3 KV heads cannot split over tensor=2 -> replicated on that dimension.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh) == P(
        "fsdp", None, None
    )
    assert logical_to_spec(("batch", "seq"), (8, 16), mesh) == P("fsdp", None)


def test_sequence_losses_jitted_with_declared_shardings_equal_one_device(tmp_path):
    """The evaluation step declares its in/out shardings; rows are padded to the dp size."""
    from davir_jax.engine.nll import sequence_losses

    make_hf_model("mistral", tmp_path)
    seqs = [list(range(1, 12)), list(range(5, 9)), list(range(20, 40))]  # 3 rows, dp = 4
    ref = sequence_losses(load_model(tmp_path), seqs)
    got = sequence_losses(load_model(tmp_path, mesh=make_mesh(1, 4, 2)), seqs)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


COMPILE_CACHE = """
import sys, time, jax, jax.numpy as jnp
from davir_jax.core.sharding import MeshConfig
from davir_jax.core.sharding import mesh_from_config
mesh_from_config(MeshConfig(fsdp=1, compile_cache=sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # store even a tiny program
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * float(sys.argv[2]))
print(jax.config.jax_compilation_cache_dir, float(f(jnp.ones((8, 8)))))
"""


def test_compile_cache_keeps_compiled_programs_across_processes(tmp_path):
    """mesh.compile_cache: a fresh process stores the program it compiled in the directory; the
    same program in a second process adds nothing (it was found), another program adds one."""
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)

    def run(scale: str) -> set[str]:
        args = [sys.executable, "-c", COMPILE_CACHE, str(cache), scale]
        out = subprocess.run(args, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == str(cache)
        return {p.name for p in cache.iterdir()}

    first = run("2.0")
    assert first, "nothing was stored"
    assert run("2.0") == first
    assert len(run("3.0") - first) >= 1
