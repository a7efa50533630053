"""The device mesh and the sharding rules of training.

Mesh: 2-D with named axes ("data", "fsdp"), both `AxisType.Auto` (jit propagates shardings from the in/out
annotations; the model code carries no sharding annotations). The batch is split over both axes (every device
gets global_batch / num_devices samples); parameters and the optimizer state are split over "fsdp" only
(FSDP / ZeRO-3 style: XLA all-gathers each weight where it is used and reduce-scatters its gradient), and
replicated over "data". fsdp = 1 is plain data parallelism.

Config (`config.mesh`): data (-1: all devices not used by fsdp), fsdp (1), fsdp_min_size (arrays with fewer
elements stay replicated: sharding them costs more in collectives than it saves).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vrtspike_jax.train.preflight import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_settings(mesh_config=None):
    """The mesh section as run_config.MeshSettings: a MeshSettings as it is; a mapping (a ConfigDict section or a plain
    dict, e.g. {"fsdp": 2}) over the defaults of vrtspike_jax/train/defaults.py; None: those defaults."""
    from vrtspike_jax.train import run_config
    from vrtspike_jax.train.defaults import base_config

    if isinstance(mesh_config, run_config.MeshSettings):
        return mesh_config
    values = base_config().mesh.to_dict()
    unknown = sorted(set(mesh_config or {}) - set(values))
    if unknown:
        raise ConfigError(f"unknown mesh key(s) {unknown}; known: {sorted(values)}")
    values.update(dict(mesh_config or {}))
    return run_config.build_section(run_config.MeshSettings, values, "mesh")


def mesh_shape(mesh_config, num_devices: int) -> tuple:
    """(data, fsdp) sizes for `num_devices`; raises ConfigError naming the sizes when they do not fit."""
    settings = mesh_settings(mesh_config)
    data, fsdp = settings.data, settings.fsdp
    if fsdp < 1:
        raise ConfigError(f"mesh.fsdp must be >= 1, got {fsdp}")
    if data == -1:
        if num_devices % fsdp:
            raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
        data = num_devices // fsdp
    if data < 1 or data * fsdp != num_devices:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {num_devices} devices are "
                         f"available (set mesh.data=-1 to use all of them)")
    return data, fsdp


def make_mesh(mesh_config=None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The training mesh with axes ("data", "fsdp") over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2 ** 14) -> P:
    """PartitionSpec of an array of `shape` under FSDP: its largest axis divisible by `fsdp_size` is split over
    "fsdp" (ties: the last such axis); arrays smaller than `min_size` elements, or with no divisible axis, are
    replicated. A function of the shape only, so parameters and their Adam moments get the same sharding."""
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0 and size >= fsdp_size]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, mesh_config=None) -> Any:
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`."""
    fsdp_size = mesh.shape[FSDP_AXIS]
    min_size = mesh_settings(mesh_config).fsdp_min_size
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp_size, min_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device ("data" x "fsdp"), the other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: Mesh, process_count: int) -> None:
    """Raises ConfigError unless the global batch splits evenly over the devices and the processes."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of the {devices} devices of the "
                          f"mesh {dict(mesh.shape)}: every device needs the same number of samples (set "
                          f"--config.global_batch_size to a multiple of {devices})")
    if global_batch_size % process_count:
        raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of the {process_count} processes")


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, keys: Sequence[str]) -> dict:
    """Global jax.Arrays (batch axis split over the mesh) from this process's numpy slices of `keys`.

    Every process passes its own consecutive block of the global batch (the input pipeline's process shards);
    `jax.make_array_from_process_local_data` assembles them without any cross-host copy.
    """
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[key])) for key in keys}


def put_global(tree: Any, shardings: Any) -> Any:
    """Places host values (identical on every process, e.g. host-initialised parameters) with `shardings`;
    each process materialises only its own shards."""

    def put(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def local_copy(tree: Any, device: Optional[jax.Device] = None) -> Any:
    """A single-device copy of fully replicated global arrays (each process reads its own replica), for
    process-local work such as validation."""
    device = device or jax.local_devices()[0]

    def copy(array):
        if not array.is_fully_replicated:
            raise ValueError(f"local_copy needs replicated arrays, got sharding {array.sharding}")
        return jax.device_put(array.addressable_data(0), device)

    return jax.tree.map(copy, tree)


__all__ = ["BATCH_AXES", "DATA_AXIS", "FSDP_AXIS", "batch_sharding", "check_batch_size", "fsdp_spec",
           "global_batch", "local_copy", "make_mesh", "mesh_settings", "mesh_shape", "put_global", "replicated", "tree_shardings"]
