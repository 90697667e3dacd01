"""`jax.distributed` initialisation and the run's device mesh (data / fsdp / tensor axes).

- On a multi-host Cloud TPU VM slice `initialize()` needs no arguments: JAX reads the
  coordinator and the worker id from the TPU metadata. Elsewhere (GPU nodes, CPU processes in
  tests) pass `coordinator_address`, `num_processes` and `process_id` explicitly — the trainer's
  `--coordinator_address / --num_processes / --process_id` flags.
- `mesh_from_config` builds the mesh from the config's axis sizes (one may be -1: the remaining
  devices). `dcn_data > 1` adds a data-parallel factor *across* slices (multi-slice over the
  data-center network): each slice holds a full replica split over its own fast ICI links.
- `global_from_local` turns each process's rows into one global array, sharded over the batch
  axes (`jax.make_array_from_process_local_data`): no host ever holds the global batch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gtpo_jax.models.sharding import MESH_AXES, make_mesh


def on_multihost_tpu_vm() -> bool:
    """True on a worker of a multi-host TPU slice (the runtime lists the other workers)."""
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, heartbeat_timeout_s: int = 100
) -> None:
    """Starts multi-process JAX when asked (explicit coordinator) or on a multi-host TPU slice.

    A process that stops answering for `heartbeat_timeout_s` makes the others fail with an error
    (instead of waiting forever in a collective).
    """
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--coordinator_address={coordinator_address} needs --num_processes >= 1 and "
                f"0 <= --process_id < num_processes; got {num_processes} and {process_id}"
            )
        # CPU processes (tests, CPU clusters) need a cross-process collectives backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s
        )
    elif on_multihost_tpu_vm():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    else:
        return
    logging.info(
        "jax.distributed: process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def mesh_from_config(data: int = 1, fsdp: int = -1, tensor: int = 1, dcn_data: int = 1) -> Mesh:
    """The run's mesh; with `dcn_data > 1` the data axis spans `dcn_data` slices."""
    if dcn_data < 1:
        raise ValueError(f"mesh.dcn_data={dcn_data}: must be >= 1")
    if dcn_data == 1:
        return make_mesh(data, fsdp, tensor)
    from jax.experimental import mesh_utils

    per_slice = jax.device_count() // dcn_data
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) == 1:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = per_slice // known
    devices = mesh_utils.create_hybrid_device_mesh(tuple(sizes), (dcn_data, 1, 1), jax.devices())
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def global_from_local(local: Any, mesh: Mesh) -> Any:
    """Per-process rows (leading axis) -> global arrays split over the mesh's batch axes."""

    def one(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        spec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return jax.tree.map(one, local)
