"""The device mesh, the one table that maps logical axis names to mesh axes, and placement helpers.

Model code names logical axes only (`batch, seq, embed, mlp, heads, kv_heads, head_dim, vocab`);
this module is the only place that knows the mesh axes `data, fsdp, tensor` (other modules use
`MESH_AXES`, `DATA_PARALLEL`, `TENSOR`, `data_parallel_size`) and the one place that resolves a
`-1` axis size from the device count (`resolve_axis_sizes`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
# The data-parallel axes: the batch is split over both (FSDP shards the weights as well).
DATA_PARALLEL = (DATA, FSDP)
# Auto axes: XLA's sharding propagation places intermediates; we constrain the few that matter.
_AUTO = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)

# The rules table: each logical axis once. Batch is split over every data-parallel axis; FSDP
# shards parameters along `embed`; tensor parallelism splits heads, MLP width and vocabulary.
# LoRA adapters carry their projection's input or output axes, so they split with it.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", DATA_PARALLEL),
    ("seq", None),
    ("embed", FSDP),
    ("mlp", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("head_dim", None),
    ("vocab", TENSOR),
    ("lora_rank", None),  # LoRA's rank axis (a few columns): replicated
)


def resolve_axis_sizes(
    data: int, fsdp: int, tensor: int, n_devices: int | None = None, where: str = "mesh."
) -> dict[str, int]:
    """The mesh axis sizes by name, with a `-1` axis filled from the device count.

    Each size must be positive or -1, and at most one may be -1; it becomes `n_devices` divided
    by the product of the others, or 1 when `n_devices` is None (a plan or a config check made
    without devices). Errors start with `where` and the axis name (the config loader reads that
    name as the key at fault). Whether the sizes then cover exactly the devices is the mesh
    builder's check (`make_mesh`).
    """
    sizes = dict(zip(MESH_AXES, (data, fsdp, tensor), strict=True))
    shown = " ".join(f"{k}={v}" for k, v in sizes.items())
    for name, s in sizes.items():
        if s == 0 or s < -1:
            raise ValueError(f"{where}{name}: must be a positive size or -1, got {s}")
    auto = [name for name, s in sizes.items() if s == -1]
    if len(auto) > 1:
        raise ValueError(f"{where}{auto[1]}: at most one mesh axis may be -1, got {shown}")
    if auto:
        known = math.prod(s for s in sizes.values() if s != -1)
        n = known if n_devices is None else n_devices
        if n % known:
            raise ValueError(
                f"{where.rstrip('.') or 'mesh'}: {n} devices are not divisible by the fixed "
                f"axes' product {known} ({shown})"
            )
        sizes[auto[0]] = n // known
    return sizes


def data_parallel_size(mesh: Mesh | Any | None) -> int:
    """How many ways the batch is split: the product of the data-parallel axes' sizes.

    `mesh`: a Mesh, anything with a `shape` mapping of axis sizes (a plan's device-free mesh),
    or None (no mesh: 1).
    """
    if mesh is None:
        return 1
    shape: Mapping[str, int] = mesh.shape
    return math.prod(shape[a] for a in DATA_PARALLEL)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one size may be -1 and fills from the device count."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = list(resolve_axis_sizes(data, fsdp, tensor, len(devices)).values())
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are present"
        )
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=_AUTO)
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=_AUTO)


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


def use_cpu_devices(n: int) -> None:
    """Split the host CPU into `n` JAX devices (`jax_num_cpu_devices`); -1: one per logical CPU
    this process may run on (hyperthreads count, cgroup CPU quotas do not); 0: leave it as it
    is (JAX's default is one device).

    Why: XLA:CPU runs a batched matrix product (attention's per-(row, KV head) products) on one
    thread per device: on 2 cores such a product ran no faster than pinned to one core. With
    one device per core and the batch split over them (`mesh.data=-1`), the devices run at
    once: scoring SmolLM2-135M on 2 cores ran 1.12-1.14x as fast (`benchmarks/RESULTS.md`; the
    step without attention gained too, so other per-device work was not spread over the cores
    either). Each device keeps its own copy of the weights unless `fsdp` shards them.

    It changes only the CPU platform; on a TPU or GPU host the accelerators stay the mesh's
    devices. It must run before JAX starts its backends (the `davir` command calls it first).
    Afterwards, or when `jax_num_cpu_devices` was already set to another count (e.g. from
    `DAVIR_LOCAL_DEVICES` under `DAVIR_DISTRIBUTED=local`), a different `n` is an error.
    """
    if n == 0:
        return
    if n < 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = n or 1
    earlier = jax.config.jax_num_cpu_devices
    if earlier > 0 and earlier != n:
        raise ValueError(
            f"mesh.cpu_devices: asks for {n} CPU devices, but jax_num_cpu_devices is already "
            f"{earlier} (DAVIR_LOCAL_DEVICES under DAVIR_DISTRIBUTED=local, or the caller); "
            "set only one of them"
        )
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends have started
        if jax.default_backend() != "cpu":
            return  # the mesh's devices are accelerators: the CPU split does not matter
        have = len(jax.devices("cpu"))
        if have != n:
            raise ValueError(
                f"mesh.cpu_devices: asks for {n} CPU devices, but JAX has already started with "
                f"{have}; it must be set before the first JAX computation"
            ) from None


def use_compile_cache(directory: str | None) -> None:
    """Keep XLA's compiled programs in `directory` (JAX's persistent compilation cache; None:
    leave JAX's setting as it is).

    Why: every stage of a pipeline (the reference, each subset SFT, each evaluation) builds its
    own jitted step, and a new function object compiles again even when the program is the same;
    the cache is keyed by the program itself, so identical steps compile once per machine (the
    SmolLM2 SFT step: about 20-40 s on 2 cores each time otherwise), across stages, processes
    and reruns. Programs that compile in under a second are not stored.
    """
    if directory is None:
        return
    path = os.path.abspath(os.path.expanduser(directory))
    if jax.config.jax_compilation_cache_dir == path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def mesh_from_config(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a config's `mesh` section describes (over all devices unless given); applies its
    runtime settings (`cpu_devices`, `compile_cache`) first."""
    use_cpu_devices(cfg.cpu_devices)
    use_compile_cache(cfg.compile_cache)
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices)


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through the rules table.

    With `shape` and `mesh`, a mesh axis that does not divide the dimension (e.g. SmolLM2's 3 KV
    heads over tensor=2) is dropped for that dimension: the array is replicated there instead of
    failing, which is what a user expects from a preset mesh on an odd model.
    """
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")
        target = table[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may appear only once per spec.
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if shape is not None:
                kept: list[str] = []
                for a in mesh_axes:
                    if shape[i] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                        kept.append(a)
                if len(kept) < len(mesh_axes):
                    log.debug(
                        "axis %s (size %d) not divisible by %s; replicated on %s",
                        name,
                        shape[i],
                        mesh_axes,
                        set(mesh_axes) - set(kept),
                    )
                mesh_axes = tuple(kept)
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*out)


def _var_axes(v: nnx.Variable) -> tuple[str | None, ...] | None:
    return v.get_metadata().get("logical_axes")


def state_shardings(state: Any, mesh: Mesh | None) -> Any:
    """Shardings for every Variable of an (abstract) nnx State, from its logical axes; without a
    mesh, everything on the first device."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(
            lambda v: v.replace(one) if isinstance(v, nnx.Variable) else one,
            state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    def f(v: Any) -> Any:
        if isinstance(v, nnx.Variable):
            shape = v.get_value().shape
            return v.replace(NamedSharding(mesh, logical_to_spec(_var_axes(v), shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, seq, ...]` input: batch over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Applies activation sharding constraints by logical axis names; a no-op without a mesh.

    Held by the model as static configuration, so model code never names a mesh axis.
    """

    mesh: Mesh | None = None
    rules: tuple[tuple[str, Any], ...] = LOGICAL_RULES

    def is_split(self, axis: str, size: int) -> bool:
        """Whether a dimension of `size` with logical name `axis` is split over devices."""
        if self.mesh is None:
            return False
        return logical_to_spec((axis,), (size,), self.mesh, self.rules)[0] is not None

    def spec(self, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        """The PartitionSpec of an array of `shape` with logical `axes` (empty without a mesh)."""
        if self.mesh is None:
            return PartitionSpec()
        return logical_to_spec(axes, shape, self.mesh, self.rules)

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        if self.mesh is None:
            return x
        spec = self.spec(axes, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def create_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
    """Build a module with every parameter born in its sharding (never materialised unsharded)."""
    if mesh is None:
        return constructor()
    abstract = nnx.eval_shape(constructor)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh)

    init = jax.jit(lambda: nnx.state(constructor()), out_shardings=shardings)
    return nnx.merge(graphdef, init())
