"""Where rows live: host arrays onto the mesh, rows laid out over the batch axes, and back.

Every array of a rollout leads with a rows axis (prompts `P`, or `P * G` samples). On a mesh
that axis is split over the batch axes (`data`, `fsdp`) when they divide it, else replicated
(`models.sharding.rows_sharding`). In a multi-process run every process holds the same host
arrays (small: prompt ids, rewards), and each device receives only its own rows.

- `put(tree)`: host arrays (the same on every process) -> global mesh arrays, rows split.
- `as_rows(tree)`: mesh arrays re-laid out with their rows split (a jitted result may come back
  with another layout).
- `local_rows(x)`: the rows of a global array this process holds, by global row index.
- `allgather(x)`: `[n_processes, ...]` of a host array.
- `padded_rows(n)`: `n` rounded up to a multiple of the batch width, so that padded row blocks
  stay split over the devices instead of being replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gtpo_jax.models.sharding import batch_width, rows_sharding


def local_rows(x: jax.Array) -> dict[int, np.ndarray]:
    """The rows (leading axis) this process holds, by global row index."""
    out: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            out.setdefault(start + i, data[i])
    return out


def allgather(x: np.ndarray) -> np.ndarray:
    """`[n_processes, ...]` of a host array (the array itself, with a leading 1, in a single-process run)."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    return np.asarray(multihost_utils.process_allgather(x))


def gather_rows(tree: Any) -> Any:
    """Global (row-split) arrays -> the whole host arrays on every process (use on small arrays)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Row placement on one mesh (see the module docstring)."""

    mesh: Mesh

    @property
    def width(self) -> int:
        """How many ways the batch axes split a rows axis."""
        return batch_width(self.mesh)

    def padded_rows(self, n: int, multiple: int = 1) -> int:
        """`n` rounded up to a multiple of `lcm(width, multiple)`."""
        m = int(np.lcm(self.width, multiple))
        return -(-n // m) * m

    def put(self, tree: Any) -> Any:
        """Host arrays (the same on every process) -> mesh arrays, rows split when the batch axes divide them."""

        def put(x: Any) -> jax.Array:
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, rows_sharding(self.mesh, x.shape), lambda index: x[index])

        return jax.tree.map(put, tree)

    def as_rows(self, tree: Any) -> Any:
        """Mesh arrays re-laid out with their rows split over the batch axes (if they divide)."""
        return jax.tree.map(lambda x: jax.device_put(x, rows_sharding(self.mesh, x.shape)), tree)
