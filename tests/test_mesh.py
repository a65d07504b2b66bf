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


def test_fit_takes_the_mesh_from_the_step_and_refuses_another_one():
    """The mesh is passed once, to the step builder: fit uses the step's; a different
    mesh= is an error naming both (before any training)."""
    import jax.numpy as jnp
    import optax

    opt = optax.sgd(0.1)
    own = jt.make_mesh(fsdp=1, devices=jax.devices()[:1])
    step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt, mesh=own)
    data = jt.ArrayDataset({"x": np.ones((4, 3), np.float32)}, 2, label_key=None)
    state = jt.TrainState.create({"w": jnp.ones(3)}, opt, 0)
    other = jt.data_mesh(jax.devices()[:1])  # another layout (axes) than the step's
    with pytest.raises(
        ValueError,
        match=r"fit\(mesh=\.\.\.\) is \{'data': 1\} .*train step was "
        r"built for the mesh \{'data': 1, 'fsdp': 1\}.*Fix: drop fit's mesh=",
    ):
        jt.fit(state, step, data, num_steps=1, mesh=other, progress=False)
    final, _ = jt.fit(state, step, data, num_steps=2, progress=False)  # the step's mesh
    assert final.params["w"].sharding.mesh == own and step.trace_count == 1


def test_fit_creates_a_state_from_a_function_in_its_shardings():
    """fit(create, ...) creates the state with init_sharded on the step's mesh: the FSDP
    rule's shardings, the values of the eagerly created state."""
    import jax.numpy as jnp
    import optax

    opt = optax.sgd(0.1)
    mesh = jt.make_mesh(fsdp=1, devices=jax.devices()[:1])
    step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt, mesh=mesh)
    data = jt.ArrayDataset({"x": np.ones((4, 3), np.float32)}, 2, label_key=None)

    def create():
        return jt.TrainState.create({"w": jnp.arange(3.0)}, opt, 0)

    made, _ = jt.fit(create, step, data, num_steps=2, progress=False)
    eager, _ = jt.fit(create(), step, data, num_steps=2, progress=False)
    np.testing.assert_array_equal(np.asarray(made.params["w"]), np.asarray(eager.params["w"]))
    assert made.params["w"].sharding.mesh == mesh and int(made.step) == 2


def test_fit_refuses_an_eval_step_built_for_another_mesh():
    """The eval step carries its mesh too (make_eval_step used to drop it, so fit's check
    never ran and a mismatch surfaced only at the first evaluation, as JAX's error)."""
    import jax.numpy as jnp
    import optax

    opt = optax.sgd(0.1)
    own = jt.make_mesh(fsdp=1, devices=jax.devices()[:1])
    step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt, mesh=own)
    other = jt.data_mesh(jax.devices()[:1])
    ev = jt.make_eval_step(lambda p, b: {"s": b["x"] @ p["w"]}, mesh=other)
    assert ev.mesh == other
    data = jt.ArrayDataset({"x": np.ones((4, 3), np.float32)}, 2, label_key=None)
    state = jt.TrainState.create({"w": jnp.ones(3)}, opt, 0)
    with pytest.raises(
        ValueError,
        match=r"the eval step's mesh is \{'data': 1\} .*train step was built for the mesh "
        r"\{'data': 1, 'fsdp': 1\}.*Fix: build the eval step with the train step's mesh=",
    ):
        jt.fit(state, step, data, num_steps=1, eval_step=ev, eval_data=data, progress=False)
    assert step.trace_count == 0  # refused before any training


def test_init_sharded_names_a_wrong_create_or_mesh():
    import jax.numpy as jnp

    mesh = jt.make_mesh(fsdp=1, devices=jax.devices()[:1])
    with pytest.raises(TypeError, match=r"init_sharded needs a function .*got dict.*Fix"):
        parallel.init_sharded({"w": jnp.ones(3)}, mesh)
    with pytest.raises(TypeError, match=r"init_sharded needs a jax.sharding.Mesh; got NoneType"):
        parallel.init_sharded(lambda: {"w": jnp.ones(3)}, None)


def test_fit_keeps_one_copy_of_a_state_it_creates():
    """fit(create, ...) used to keep the created state alive next to its own copy for the
    whole training: twice the state's memory, where sharded creation is meant to save it."""
    import jax.numpy as jnp
    import optax

    shape = (257, 1031)  # no other live array has it
    opt = optax.sgd(0.1)
    mesh = jt.make_mesh(fsdp=1, devices=jax.devices()[:1])
    step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt, mesh=mesh)
    data = jt.ArrayDataset({"x": np.ones((4, shape[0]), np.float32)}, 2, label_key=None)
    counts = []

    class Count(jt.Callback):
        def on_call_end(self, loop):
            counts.append(sum(x.shape == shape for x in jax.live_arrays()))

    def create():
        return jt.TrainState.create({"w": jnp.ones(shape)}, opt, 0)

    jt.fit(create, step, data, num_steps=2, progress=False, callbacks=[Count()])
    assert counts == [1, 1]
