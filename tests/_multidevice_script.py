"""Run by tests/test_multidevice.py in a subprocess with 8 virtual CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts, which
is why this runs in its own process. Trains the same MLP on digits on an 8-device data
mesh and on a 1-device mesh, checks where batches and parameters live, and prints one
JSON line (prefixed with RESULT:) for the test to assert on.
"""

import json
import sys

import jax
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss, init_model
from jaxtrain.data import load_digits

NUM_STEPS = 30
BATCH = 64


def _sharding_info(state, batch, n_devices):
    leaves = jax.tree.leaves(state.params)
    return {
        "x_num_shards": len(batch["x"].addressable_shards),
        "x_shard_shapes": sorted({tuple(s.data.shape) for s in batch["x"].addressable_shards}),
        "x_shard_devices": len({s.device for s in batch["x"].addressable_shards}),
        "x_fully_replicated": bool(batch["x"].sharding.is_fully_replicated),
        "mask_num_shards": len(batch["mask"].addressable_shards),
        "params_replicated": all(
            leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == n_devices
            for leaf in leaves
        ),
    }


def run(devices):
    mesh = jt.data_mesh(devices)
    train, test = load_digits()
    model = jt.from_linen(jt.models.MLP(hidden=(64,), num_outputs=10))
    optimizer = optax.sgd(0.1, momentum=0.9)
    params, model_state = init_model(model, 0, train["x"][:1])
    state = jt.TrainState.create(params, optimizer, 0, model_state)
    train_step = jt.make_train_step(classification_loss(model), optimizer, mesh=mesh)
    eval_step = jt.make_eval_step(classification_eval(model), mesh=mesh)
    seen = []

    def recording_step(state, batch):
        if not seen:  # inspect the first batch and state as fit hands them to the step
            seen.append(_sharding_info(state, batch, len(devices)))
        return train_step(state, batch)

    data = jt.ArrayDataset(train, BATCH, seed=0)
    state, history = jt.fit(
        state,
        recording_step,
        data,
        num_steps=NUM_STEPS,
        log_every=1,
        mesh=mesh,
        progress=False,
    )
    final_params_replicated = all(
        leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(devices)
        for leaf in jax.tree.leaves(state.params)
    )
    eval_metrics = jt.evaluate(eval_step, state, jt.ArrayDataset(test, BATCH, shuffle=False), mesh)
    return {
        "losses": [r["loss"] for r in history.train],
        "steps": history.steps,
        "epochs_seen": sorted({r["epoch"] for r in history.train}),
        "trace_count": train_step.trace_count,
        "eval_trace_count": eval_step.trace_count,
        "first_batch": seen[0],
        "final_params_replicated": final_params_replicated,
        "eval": eval_metrics,
        "params": jax.tree.map(np.asarray, jax.device_get(state.params)),
    }


def main():
    result = {"device_count": jax.device_count(), "platform": jax.devices()[0].platform}
    eight = run(jax.devices())
    one = run(jax.devices()[:1])
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), eight.pop("params"), one["params"])
    )
    one.pop("params")
    result.update(eight=eight, one=one, params_max_abs_diff=max(diffs))

    # A batch that does not split over 8 devices is refused with a clear error.
    try:
        jt.shard_batch({"x": np.zeros((60, 3), np.float32)}, jt.data_mesh())
        result["shard_60_error"] = None
    except ValueError as e:
        result["shard_60_error"] = str(e)
    sharded = jt.shard_batch({"x": np.zeros((64, 3), np.float32)}, jt.data_mesh())
    result["shard_64_shapes"] = sorted(
        {tuple(s.data.shape) for s in sharded["x"].addressable_shards}
    )
    print("RESULT:" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
