"""The run's mesh and per-process input assembly (single process, 8 CPU devices)."""

import jax
import numpy as np
import pytest

from gtpo_jax.parallel.mesh import global_from_local, initialize, mesh_from_config


def test_mesh_from_config_fills_the_free_axis():
    mesh = mesh_from_config(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="mesh.dcn_data=0"):
        mesh_from_config(dcn_data=0)


def test_global_batch_from_process_local_rows():
    mesh = mesh_from_config(data=1, fsdp=-1, tensor=1)
    local = {"tokens": np.arange(16 * 3).reshape(16, 3), "valid": np.ones((16,), bool)}
    out = global_from_local(local, mesh)
    assert out["tokens"].shape == (16, 3) and len(out["tokens"].sharding.device_set) == 8
    assert out["tokens"].addressable_shards[1].data.shape == (2, 3)  # split over the 8 batch shards
    np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])


def test_initialize_checks_its_arguments_and_is_a_no_op_alone():
    initialize()  # no coordinator, not a TPU slice: nothing happens
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="needs --num_processes >= 1"):
        initialize("127.0.0.1:1234", 0, 0)
