"""Run by tests/test_multihost.py: one process of a 2-process run, or the 1-process reference.

``worker PORT PROCESS_ID OUT``: joins a 2-process run on 127.0.0.1:PORT (CPU, gloo, 2
virtual devices per process, set by the parent through XLA_FLAGS), trains a small MLP
on digits with `fit` over the global 4-device mesh, checkpoints into OUT/ckpt
cooperatively, and prints one ``RESULT:`` JSON line; process 0 also saves its final
parameters to OUT/params_multi.npz.

``reference OUT``: one process with 4 virtual devices trains on the same global batches
(alongside the workers), waits for the 2-process run to finish, then restores its
checkpoint in this single process and compares.
"""

import json
import os
import sys
import time

import jax
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss, init_model
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.data import load_digits

GRAIN_STEPS = 8
NUM_STEPS = 30  # crosses the end of epoch 0 (23 batches of 64, the last one padded)
BATCH = 64
WAIT_SECONDS = 150


class ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(dict(record))


def train(mesh, ckpt_dir):
    train_data, test_data = load_digits()
    model = jt.from_linen(jt.models.MLP(hidden=(32,), num_outputs=10))
    optimizer = optax.sgd(0.1, momentum=0.9)
    params, model_state = init_model(model, 0, train_data["x"][:1])
    state = jt.TrainState.create(params, optimizer, 0, model_state)
    train_step = jt.make_train_step(classification_loss(model), optimizer, mesh=mesh)
    eval_step = jt.make_eval_step(classification_eval(model), mesh=mesh)
    writer = ListWriter()
    with Checkpointer(ckpt_dir, keep_last=2) as ckpt:
        state, history = jt.fit(
            state,
            train_step,
            jt.ArrayDataset(train_data, BATCH, seed=0),
            num_steps=NUM_STEPS,
            eval_step=eval_step,
            eval_data=jt.ArrayDataset(test_data, 120, shuffle=False),
            log_every=5,
            mesh=mesh,
            writers=[writer],
            progress=True,
            checkpointer=ckpt,
        )
        steps = ckpt.all_steps()
    return state, history, writer, train_step, steps, (model, optimizer, params, model_state)


def train_grain(mesh):
    """A short run fed by `GrainData` (every process runs the same pipeline, keeps its rows)."""
    train_data, _ = load_digits()
    records = [{"x": x, "y": y} for x, y in zip(train_data["x"], train_data["y"], strict=True)]
    model = jt.from_linen(jt.models.MLP(hidden=(32,), num_outputs=10))
    optimizer = optax.sgd(0.1, momentum=0.9)
    params, model_state = init_model(model, 0, train_data["x"][:1])
    state = jt.TrainState.create(params, optimizer, 0, model_state)
    loss = classification_loss(model)
    seen = []

    def loss_fn(params, batch, **kwargs):
        seen.append(batch["x"].shape[0])  # at trace time: the global batch the step sees
        return loss(params, batch, **kwargs)

    step = jt.make_train_step(loss_fn, optimizer, mesh=mesh)
    state, history = jt.fit(
        state,
        step,
        jt.GrainData(records, BATCH, seed=0),
        num_steps=GRAIN_STEPS,
        log_every=2,
        mesh=mesh,
        progress=False,
    )
    history.global_batch_rows = seen
    return state, history


def params_of(state):
    return {
        jt.checkpoint.leaf_name(p): np.asarray(jax.device_get(x))
        for p, x in jax.tree_util.tree_leaves_with_path(state.params)
    }


def worker(port, pid, out):
    info = jt.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
    mesh = jt.data_mesh()
    state, history, writer, train_step, steps, _ = train(mesh, os.path.join(out, "ckpt"))
    leaf = jax.tree.leaves(state.params)[0]
    result = {
        "process_index": info.process_index,
        "process_count": info.process_count,
        "local_device_count": info.local_device_count,
        "device_count": info.device_count,
        "rows": [
            jt.parallel.process_rows(mesh, BATCH).start,
            jt.parallel.process_rows(mesh, BATCH).stop,
        ],
        "params_global": not leaf.is_fully_addressable,
        "params_replicated": leaf.sharding.is_fully_replicated,
        "records_written": len(writer.records),
        "losses": [r["loss"] for r in history.train],
        "eval": history.eval[-1],
        "examples": history.examples,
        "steps": history.steps,
        "trace_count": train_step.trace_count,
        "checkpoint_steps": steps,
    }
    if info.is_primary:
        np.savez(os.path.join(out, "params_multi.tmp.npz"), **params_of(state))
        # Renamed when complete: the reference process, started alongside, waits for it.
        os.replace(os.path.join(out, "params_multi.tmp.npz"), os.path.join(out, "params_multi.npz"))
    g_state, g_history = train_grain(mesh)
    result["grain_losses"] = [r["loss"] for r in g_history.train]
    result["grain_examples"] = g_history.examples
    result["grain_global_batch_rows"] = g_history.global_batch_rows
    if info.is_primary:
        tmp = os.path.join(out, "params_grain_multi.tmp.npz")
        np.savez(tmp, **params_of(g_state))
        os.replace(tmp, os.path.join(out, "params_grain_multi.npz"))
    print("RESULT:" + json.dumps(result), flush=True)
    jt.distributed.shutdown()


def reference(out):
    mesh = jt.data_mesh()
    state, history, _, train_step, _, parts = train(mesh, os.path.join(out, "ckpt_ref"))
    model, optimizer, params, model_state = parts
    ref = params_of(state)
    path = os.path.join(out, "params_multi.npz")
    deadline = time.monotonic() + WAIT_SECONDS
    while not os.path.exists(path):  # the 2-process run is still going
        if time.monotonic() > deadline:
            raise TimeoutError(f"the 2-process run wrote no {path} in {WAIT_SECONDS} s")
        time.sleep(0.2)
    multi = dict(np.load(path))
    # The 2-process checkpoint, restored in this one process onto a single device.
    target = jt.TrainState.create(params, optimizer, 0, model_state)
    with Checkpointer(os.path.join(out, "ckpt")) as ckpt:
        restored = ckpt.restore(target, mesh=jt.data_mesh(jax.devices()[:1]))
    got = params_of(restored.state)
    result = {
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "losses": [r["loss"] for r in history.train],
        "eval": history.eval[-1],
        "examples": history.examples,
        "restored_step": restored.step,
        "restored_devices": len(jax.tree.leaves(restored.state.params)[0].sharding.device_set),
        "max_abs_diff_multi_vs_ref": max(float(np.max(np.abs(multi[k] - ref[k]))) for k in ref),
        "max_abs_ref": max(float(np.max(np.abs(ref[k]))) for k in ref),
        "restored_equals_multi": all(np.array_equal(got[k], multi[k]) for k in multi),
        "params_moved": max(
            float(
                np.max(
                    np.abs(
                        ref[k]
                        - np.asarray(params_of(jt.TrainState.create(params, optimizer, 0))[k])
                    )
                )
            )
            for k in ref
        ),
    }
    g_state, g_history = train_grain(mesh)
    result["grain_losses"] = [r["loss"] for r in g_history.train]
    result["grain_examples"] = g_history.examples
    result["grain_global_batch_rows"] = g_history.global_batch_rows
    g_ref = params_of(g_state)
    g_multi = dict(np.load(wait_for(os.path.join(out, "params_grain_multi.npz"))))
    result["grain_max_abs_diff_multi_vs_ref"] = max(
        float(np.max(np.abs(g_multi[k] - g_ref[k]))) for k in g_ref
    )
    print("RESULT:" + json.dumps(result), flush=True)


def wait_for(path):
    deadline = time.monotonic() + WAIT_SECONDS
    while not os.path.exists(path):  # the 2-process run is still going
        if time.monotonic() > deadline:
            raise TimeoutError(f"the 2-process run wrote no {path} in {WAIT_SECONDS} s")
        time.sleep(0.2)
    return path


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        reference(sys.argv[2])
