"""Mesh construction and the one table that maps logical axis names onto it.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, ...); activations are
constrained with the same names. Changing a parallelism layout is editing `RULES`, not the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdlm.errors import JdlmError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (None: replicated).
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "layers": None,
}


def parse_mesh(spec: str | None) -> dict[str, int]:
    """Parse `data=D,fsdp=F,tensor=T` (any subset; -1 means "all remaining devices")."""
    sizes = {"data": 1, "fsdp": -1, "tensor": 1}
    if not spec:
        return sizes
    explicit_fsdp = False
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise JdlmError(
                f"bad mesh entry {part!r} in {spec!r}; write e.g. --mesh data=2,fsdp=2,tensor=2 "
                f"with axes from {MESH_AXES}"
            )
        sizes[name] = int(value)
        explicit_fsdp |= name == "fsdp"
    if not explicit_fsdp:
        sizes["fsdp"] = -1
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices)."""
    sizes = parse_mesh(spec) if not isinstance(spec, dict) else dict(spec)
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise JdlmError(f"mesh {sizes}: at most one axis may be -1")
    if free:
        if n % fixed:
            raise JdlmError(f"mesh {sizes} does not divide the {n} available devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        shape = ",".join(f"{k}={v}" for k, v in sizes.items())
        raise JdlmError(
            f"mesh {shape} needs {math.prod(sizes.values())} devices but {n} are available; "
            "choose sizes whose product is the device count"
        )
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor with these logical axes.

    A dimension that the mesh axes do not divide stays replicated (tiny models with odd sizes);
    a mesh axis is used at most once per tensor.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        mesh_axes = RULES.get(name) if name else None
        chosen = []
        for ax in mesh_axes or ():
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            total = math.prod(mesh.shape[a] for a in chosen) * size
            if shape is not None and shape[i] % total:
                continue
            chosen.append(ax)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh))
