"""A population on a 4-device data mesh (members replicated, batch sharded) against one device.

Run by tests/test_population_fit.py with 4 virtual CPU devices; prints one RESULT: line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain import population as pop
from jaxtrain.population_step import make_population_step


def loss_fn(params, batch, smooth=0.0):
    y = jax.nn.one_hot(batch["y"], 3) * (1 - smooth) + smooth / 3
    return jnp.mean(-jnp.sum(y * jax.nn.log_softmax(batch["x"] @ params["w"]), -1))


opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
rs = np.random.RandomState(0)
x = rs.randn(64, 5).astype(np.float32)
data = jt.ArrayDataset({"x": x, "y": (x[:, 0] > 0).astype(np.int32)}, 16)
p0 = pop.create(
    lambda k: {"w": jax.random.normal(k, (5, 3)) * 0.1},
    opt,
    [0, 1, 2],
    hparams={"learning_rate": [1e-3, 1e-2, 1e-1]},
    loss_hparams={"smooth": [0.0, 0.1, 0.0]},
)
out = {}
for name, devices, split in (
    ("four", jax.devices(), False),
    ("one", jax.devices()[:1], False),
    ("split", jax.devices(), True),  # shard_members: 2 members per device
    ("loop", jax.devices(), False),  # vectorize="loop": one member per call, on the mesh
):
    mesh = jt.data_mesh(devices)
    members = pop.from_states(
        [pop.extract_member(p0, i % 3) for i in range(8)],
        seeds=[i % 3 for i in range(8)],
        loss_hparams={"smooth": [[0.0, 0.1, 0.0][i % 3] for i in range(8)]},
    )
    start = members if split else p0
    step = make_population_step(
        loss_fn,
        opt,
        steps_per_call=2,
        mesh=mesh,
        grad_accum_steps=2,
        shard_members=split,
        vectorize="loop" if name == "loop" else "auto",
    )
    state, h = jt.fit(start, step, data, epochs=2, mesh=mesh, progress=False, log_every=4)
    w = state.params["w"]
    out[name] = {
        "w": np.asarray(w)[:3].tolist(),
        "replicated": bool(w.sharding.is_fully_replicated),
        "spec": str(w.sharding.spec),
        "devices": len(w.sharding.device_set),
        "traces": step.trace_count,
        "loss": h.train[-1]["loss"][:3],
    }
print("RESULT:" + json.dumps(out))
