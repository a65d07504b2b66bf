"""The mesh helpers build their meshes with ``jax.make_mesh`` (topology-aware), Auto axes."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxtrain as jt
from jaxtrain import parallel


@pytest.fixture
def make_mesh_calls(monkeypatch):
    """Records each ``jax.make_mesh`` call (and still builds the mesh with it)."""
    calls = []
    real = jax.make_mesh

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(jax, "make_mesh", spy)
    return calls


@pytest.mark.skipif(not parallel._TOPOLOGY_MESH, reason="this jax has no make_mesh(devices=)")
@pytest.mark.parametrize("helper", ["data_mesh", "make_mesh"])
def test_mesh_helpers_use_jax_make_mesh_with_auto_axes(helper, make_mesh_calls):
    devices = jax.devices()[:1]
    mesh = jt.data_mesh(devices) if helper == "data_mesh" else jt.make_mesh(devices=devices)
    assert len(make_mesh_calls) == 1, make_mesh_calls
    args, kwargs = make_mesh_calls[0]
    assert list(kwargs["devices"]) == devices
    # Auto, not jax.make_mesh's Explicit default: jit keeps propagating the shardings.
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}, mesh.axis_types
    names = ("data",) if helper == "data_mesh" else ("data", "fsdp")
    assert mesh.axis_names == names and args[1] == names
    # The same mesh as the plain constructor gives on one CPU device.
    assert mesh == Mesh(np.array(devices).reshape(mesh.devices.shape), names)


def test_mesh_falls_back_to_the_given_order_without_jax_make_mesh(monkeypatch):
    monkeypatch.setattr(parallel, "_TOPOLOGY_MESH", False)

    def refuse(*args, **kwargs):
        raise AssertionError("jax.make_mesh called although this jax lacks devices=")

    monkeypatch.setattr(jax, "make_mesh", refuse)
    devices = jax.devices()[:1]
    assert jt.make_mesh(devices=devices) == Mesh(np.array(devices).reshape(1, 1), ("data", "fsdp"))
    assert dict(jt.data_mesh(devices).shape) == {"data": 1}


@pytest.mark.skipif(not parallel._TOPOLOGY_MESH, reason="this jax has no make_mesh(devices=)")
def test_mesh_falls_back_when_jax_make_mesh_cannot_map_the_topology(monkeypatch):
    def cannot(*args, **kwargs):
        raise ValueError("`jax.make_mesh` does not support multi-slice topologies.")

    monkeypatch.setattr(jax, "make_mesh", cannot)
    devices = jax.devices()[:1]
    assert jt.data_mesh(devices) == Mesh(np.array(devices), ("data",))


def test_processes_must_stay_contiguous():
    def dev(p):
        return types.SimpleNamespace(process_index=p)

    grid = np.empty(4, dtype=object)
    grid[:] = [dev(0), dev(0), dev(1), dev(1)]
    assert parallel._processes_contiguous(grid)
    grid[:] = [dev(0), dev(1), dev(0), dev(1)]  # a ring that alternates hosts
    assert not parallel._processes_contiguous(grid.reshape(2, 2))


def test_make_mesh_still_refuses_a_bad_shape_with_the_fix():
    with pytest.raises(ValueError, match=r"data \* fsdp must equal the number of devices.*Fix"):
        jt.make_mesh(data=2, fsdp=1, devices=jax.devices()[:1])
