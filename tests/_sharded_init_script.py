"""Run by tests/test_sharded.py in a subprocess with 8 virtual CPU devices.

Creates an MLP's `TrainState` (Adam) with `jaxtrain.parallel.init_sharded` on an
fsdp=8 mesh and on a data=2 x fsdp=4 mesh, and compares it with the state created
eagerly and then placed (`shard_state`): the same shardings (the FSDP rule) and the
same values, bitwise. Also checks that no jitted init output was ever unsharded: the
compiled init's per-device output bytes. Prints one ``RESULT:`` JSON line.
"""

import json

import jax
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain.apps.tasks import init_model
from jaxtrain.checkpoint import leaf_name
from jaxtrain.parallel import init_sharded, make_mesh, shard_state, state_shardings

MODEL = jt.models.MLP(hidden=(512, 512), num_outputs=10)


def create():
    model = jt.from_linen(MODEL)
    params, model_state = init_model(model, 0, np.zeros((1, 64), np.float32))
    return jt.TrainState.create(params, optax.adam(1e-3), 0, model_state)


def compare(mesh):
    sharded = init_sharded(create, mesh)
    placed = shard_state(create(), mesh)
    want = state_shardings(placed, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(sharded)
    return {
        "rule": all(
            x.sharding.is_equivalent_to(w, x.ndim)
            for (_, x), w in zip(leaves, jax.tree.leaves(want), strict=True)
        ),
        "split_leaves": sum(not x.sharding.is_fully_replicated for _, x in leaves),
        "bitwise": all(
            np.array_equal(
                np.asarray(
                    jax.random.key_data(a)
                    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                    else a
                ),
                np.asarray(
                    jax.random.key_data(b)
                    if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key)
                    else b
                ),
            )
            for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(placed), strict=True)
        ),
        "names": len(leaves),
        "largest_shard_fraction": max(
            x.addressable_shards[0].data.size / x.size for _, x in leaves if x.size >= 2**12
        ),
        "first": leaf_name(leaves[0][0]),
    }


def eval_mesh_error():
    """fit with a train step built without a mesh (the state on all 8 devices) and an
    eval step built for 4 of them: refused before training, naming both meshes."""
    import jax.numpy as jnp

    opt = optax.sgd(0.1)
    step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
    ev = jt.make_eval_step(
        lambda p, b: {"s": b["x"] @ p["w"]}, mesh=jt.data_mesh(jax.devices()[4:])
    )
    data = jt.ArrayDataset({"x": np.ones((16, 3), np.float32)}, 8, label_key=None)
    state = jt.TrainState.create({"w": jnp.ones(3)}, opt, 0)
    try:
        jt.fit(state, step, data, num_steps=1, eval_step=ev, eval_data=data, progress=False)
    except ValueError as e:
        return {"message": str(e), "train_traces": step.trace_count}
    return {"message": None, "train_traces": step.trace_count}


if __name__ == "__main__":
    out = {
        "devices": jax.device_count(),
        "fsdp8": compare(make_mesh(fsdp=8)),
        "data2_fsdp4": compare(make_mesh(data=2, fsdp=4)),
        "eval_mesh_error": eval_mesh_error(),
    }
    print("RESULT:" + json.dumps(out), flush=True)
