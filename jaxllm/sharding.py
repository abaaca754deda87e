"""Sharding as data: a device `Mesh` from a flag, and one table from logical axes to mesh axes.

Every model variable carries logical axis names (`axes` metadata, e.g. `("layers", "embed",
"kv_lora")`). `RULES` maps each logical axis to a mesh axis (or None, replicated); a dimension is
sharded only when the mesh axis divides it, and a mesh axis is used at most once per array, so any
mesh works for any preset (7 experts on a 2-way `expert` axis simply stay replicated). Training
refuses such a mesh (`check_mesh`): an axis that splits nothing is a mistake, not a choice.

Mesh axes:
- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style;
  XLA inserts the all-gathers and reduce-scatters);
- `expert`: expert parallelism (routed experts split across devices; tokens sharded too).
The batch is sharded over all three. While the train step is traced (`tracing_on`), the routed
experts' dispatch runs per `data` x `fsdp` shard (`map_batch_shards`) and the embedding tables are
gathered before their lookup (`replicate`): left to the partitioner, one sort of the whole step's
tokens made every device run the experts on all of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = MESH_AXES

# logical axis -> mesh axis. The one table; change it to change the parallelism.
RULES: dict[str, str | None] = {
    "layers": None,
    "embed": "fsdp",
    "vocab": None,
    "positions": None,
    # The attention's up-projections from the latent ([latent, heads x dims]) have no `embed` axis:
    # without these two they stayed whole on every device under `fsdp` (8% more parameter memory
    # per device than an even split at fsdp=8 for seed-973m). An `fsdp` size that does not divide
    # the latent sizes (192 for seed-973m) still leaves them whole.
    "q_lora": "fsdp",
    "kv_lora": "fsdp",
    "heads": None,
    "mlp": None,
    "exp": "expert",
    "exp_router": None,
    "norm": None,
}


def parse_mesh_spec(spec: str | None, n_devices: int) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> sizes of every mesh axis (missing axes are 1; one axis may be `-1`, the
    rest of the devices). Default (None or ""): every device on `data`."""
    sizes = {a: 1 for a in MESH_AXES}
    if not spec:
        sizes["data"] = n_devices
        return sizes
    free, seen = None, set()
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"--mesh: expected axis=size with axes {', '.join(MESH_AXES)}, got {part!r}")
        if name in seen:
            raise ValueError(f"--mesh: axis {name!r} is given twice in {spec!r}")
        seen.add(name)
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"--mesh: size of axis {name!r} must be an integer, got {value!r}") from None
        if size == -1:
            if free is not None:
                raise ValueError("--mesh: only one axis may be -1")
            free = name
        elif size <= 0:
            raise ValueError(f"--mesh: size of axis {name!r} must be positive, got {size}")
        sizes[name] = size
    if free is not None:
        rest = math.prod(v for k, v in sizes.items() if k != free)
        if n_devices % rest:
            raise ValueError(f"--mesh: {n_devices} devices cannot be split as {spec}")
        sizes[free] = n_devices // rest
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"--mesh {spec} uses {math.prod(sizes.values())} devices, but there are {n_devices}")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    from jax.experimental import mesh_utils

    try:
        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - a shape that does not map onto the physical axes
        try:  # (a TPU slice: e.g. fsdp=8 on a 4 x 4 torus spans two physical axes)
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except Exception:  # noqa: BLE001 - fall back to device order (odd topologies)
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    rules: dict[str, str | None] = RULES) -> P:
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1 or dim % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            used.add(mesh_axis)
            out.append(mesh_axis)
    return P(*out)


def state_shardings(state: Any, mesh: Mesh, rules: dict[str, str | None] = RULES):
    """A pytree of NamedShardings for an `nnx.State` (abstract or not), from the `axes` metadata."""

    def one(v):
        if isinstance(v, nnx.Variable):
            value = v.get_value()
            axes = v.get_metadata().get("axes") or (None,) * len(value.shape)
            return v.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_spec(mesh: Mesh, batch_size: int, leading: int = 0) -> P:
    """PartitionSpec of a `[*leading, batch, ...]` array: batch over every mesh axis that divides
    it (all of them for a valid batch, see `check_batch`)."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return P(*([None] * leading), axes if axes else None)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} cannot be divided over the mesh's {n} batch shards "
                         f"({dict(mesh.shape)}); use a multiple of {n} (--batch-size is global: for the same "
                         f"sequences per step, raise it and lower --grad-accum)")


def check_mesh(mesh: Mesh, *, hidden_size: int, num_routed_experts: int) -> None:
    """ValueError (naming `--mesh`) for an axis that would leave what it exists for unsplit: `fsdp`
    must divide the hidden size (the dimension its parameters are sharded on), `expert` the routed
    experts. Otherwise every parameter (or expert) would silently stay replicated."""
    fsdp, expert = mesh.shape["fsdp"], mesh.shape["expert"]
    if fsdp > 1 and hidden_size % fsdp:
        raise ValueError(f"--mesh: fsdp={fsdp} does not divide hidden_size {hidden_size}, so no parameter would be "
                         f"sharded; use a divisor of {hidden_size} (and data= for the other devices)")
    if expert > 1 and num_routed_experts % expert:
        raise ValueError(f"--mesh: expert={expert} does not divide the {num_routed_experts} routed experts; "
                         f"use a divisor of {num_routed_experts} (and data= for the other devices)")


# The mesh of the step being traced (set by the train step): the model's few explicit placements
# below apply only under it, so that the model itself stays mesh-agnostic.
_TRACE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("trace_mesh", default=None)


@contextlib.contextmanager
def tracing_on(mesh: Mesh):
    """`replicate` and `map_batch_shards` act on `mesh` while a function is traced under this."""
    token = _TRACE_MESH.set(mesh)
    try:
        yield
    finally:
        _TRACE_MESH.reset(token)


def replicate(x):
    """`x` whole on every device (a parameter all-gathered before use, ZeRO-3 style) under
    `tracing_on`; otherwise `x` itself. For the embedding tables: left to itself, the partitioner
    keeps the lookup's gradient split like the table (hidden over `fsdp`) and, from rows split over
    `data` and `fsdp`, can only get there by replicating the whole `[batch, seq, hidden]` gradient
    ("Involuntary full rematerialization")."""
    mesh = _TRACE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def map_batch_shards(fn, batched: tuple, whole: tuple):
    """`fn(*batched, *whole)` for a computation that is independent per row of `batched` (their
    leading dimension), run under `tracing_on` by each `data` and `fsdp` shard on its own rows
    with the `whole` arrays gathered in full (`shard_map`; the `expert` axis stays with the
    partitioner); otherwise `fn` itself. For the routed experts' dispatch: as one global sort of
    every shard's tokens, the partitioner ran the experts on all of the step's tokens on every
    device (and resharded their gradient through a full replication)."""
    mesh = _TRACE_MESH.get()
    axes = () if mesh is None else tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    if not axes:
        return fn(*batched, *whole)
    rows = P(axes)
    # Manual over the axes of size 1 too (they split nothing): with any axis left to the
    # partitioner, the psum of a `whole` array's gradient reduces through a sharding constraint,
    # and XLA's CPU compiler aborts the process on such a bfloat16 all-reduce ("Invalid binary
    # instruction opcode copy", JAX 0.10.2: --dtype bfloat16 on several CPU devices).
    manual = set(axes) | {a for a in MESH_AXES if mesh.shape[a] == 1}
    # check_vma=False: jnp.searchsorted fails under shard_map's replication checks (JAX 0.10.2).
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows,) * len(batched) + (P(),) * len(whole),
                         out_specs=rows, axis_names=manual, check_vma=False)(*batched, *whole)
