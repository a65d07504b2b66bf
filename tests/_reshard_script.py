"""Run with 8 virtual CPU devices: save from one device count, restore onto another."""

import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain.checkpoint import Checkpointer


def same(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


assert jax.device_count() == 8
model = jt.from_linen(jt.models.MLP(hidden=(16,)))
params, _ = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
opt = optax.adam(1e-3)
state = jt.TrainState.create(params, opt, 0)
mesh8, mesh1 = jt.data_mesh(), jt.data_mesh(jax.devices()[:1])
result = {"devices": jax.device_count()}
for name, src, dst in (("8_to_1", mesh8, mesh1), ("1_to_8", mesh1, mesh8)):
    placed = jt.replicate(state, src)
    with tempfile.TemporaryDirectory() as d, Checkpointer(d) as c:
        c.save(1, placed)
        c.wait()
        r = c.restore(state, mesh=dst)
        leaf = jax.tree.leaves(r.state.params)[0]
        result[name] = [len(leaf.sharding.device_set), same(r.state, state)]
print(json.dumps(result))
