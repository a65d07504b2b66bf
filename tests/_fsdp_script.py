"""Run by tests/test_fsdp.py in a subprocess with 8 virtual CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts. Trains
one MLP with Adam on digits three ways — replicated on an 8-device data mesh, FSDP over
8 devices, and data=2 x fsdp=4 (also fused, 4 steps per call) — and reports losses,
where every state leaf lives, the compiled step's per-device argument bytes, and
checkpoint round trips between the layouts, as one ``RESULT:`` JSON line.
"""

import json
import sys
import tempfile

import jax
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss, init_model
from jaxtrain.checkpoint import Checkpointer, leaf_name
from jaxtrain.data import load_digits

NUM_STEPS = 12
BATCH = 64
# 64 -> 512 -> 512 -> 10: every kernel has a dimension of 512, divisible by 8 and 4, and
# the kernels hold 99% of the parameters; the biases (512, 10 elements) stay replicated.
MODEL = jt.models.MLP(hidden=(512, 512), num_outputs=10)


def setup():
    train, _ = load_digits()
    model = jt.from_linen(MODEL)
    optimizer = optax.adam(1e-3)
    params, model_state = init_model(model, 0, train["x"][:1])
    state = jt.TrainState.create(params, optimizer, 0, model_state)
    return train, model, optimizer, state


def specs(tree):
    return {
        leaf_name(p): list(x.sharding.spec) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def host(tree):
    return {leaf_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def run(mesh, steps_per_call=None):
    train, model, optimizer, state = setup()
    loss_fn = classification_loss(model)
    if steps_per_call:
        step = jt.make_train_steps(loss_fn, optimizer, steps_per_call=steps_per_call, mesh=mesh)
    else:
        step = jt.make_train_step(loss_fn, optimizer, mesh=mesh)
    data = jt.ArrayDataset(train, BATCH, seed=0)
    placed = jt.shard_state(state, mesh)
    batch = jt.shard_batch(next(iter(data.batches(0))), mesh)
    mem = None
    if not steps_per_call:
        mem = step.lower(placed, batch).compile().memory_analysis()
    first_specs = specs(placed)
    final, history = jt.fit(
        state, step, data, num_steps=NUM_STEPS, log_every=1, mesh=mesh, progress=False
    )
    batch_bytes = sum(s.data.nbytes for v in batch.values() for s in v.addressable_shards[:1])
    return {
        "losses": [r["loss"] for r in history.train],
        "trace_count": step.trace_count,
        "arg_bytes": None if mem is None else int(mem.argument_size_in_bytes),
        "batch_bytes_per_device": int(batch_bytes),
        "state_bytes_total": int(sum(x.nbytes for x in jax.tree.leaves(placed))),
        "placed_specs": first_specs,
        "final_specs": specs(final),
        # The step kept the rule's layout (equivalent shardings: P('fsdp') == P('fsdp', None)).
        "final_matches_rule": all(
            x.sharding.is_equivalent_to(want, x.ndim)
            for x, want in zip(
                jax.tree.leaves(final),
                jax.tree.leaves(jt.parallel.state_shardings(final, mesh)),
                strict=True,
            )
        ),
        "final_state": final,
    }


def device_epoch(mesh):
    """One device-resident epoch (make_device_epoch) on ``mesh``: final params, traces."""
    train, model, optimizer, state = setup()
    data = jt.ArrayDataset(train, BATCH, seed=0)
    fn = jt.make_device_epoch(classification_loss(model), optimizer, data, mesh=mesh)
    final, _ = jt.fit(state, fn, data, epochs=1, mesh=mesh, log_every=100, progress=False)
    matches = all(
        x.sharding.is_equivalent_to(want, x.ndim)
        for x, want in zip(
            jax.tree.leaves(final),
            jax.tree.leaves(jt.parallel.state_shardings(final, mesh)),
            strict=True,
        )
    )
    return host(final.params), fn.trace_count, matches


def train_command():
    """`jaxtrain train --fsdp 4` (via digits.run) next to the same run without sharding."""
    from jaxtrain.apps import digits

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for n in (1, 4):
            cfg = digits.TrainConfig(
                model="mlp",
                epochs=1,
                fsdp=n,
                out=f"{d}/{n}",
                progress=False,
                checkpoint=False,
            )
            summary = digits.run(cfg)
            out[str(n)] = {
                "test": summary["test"],
                "train_loss": summary["train"]["loss"],
                "steps": summary["steps"],
                "compilations": summary["train_step_compilations"],
            }
        try:
            digits.run(digits.TrainConfig(model="mlp", epochs=1, fsdp=3, out=f"{d}/3"))
            out["error"] = None
        except ValueError as e:
            out["error"] = str(e)
    return out


def checkpoints(final_fsdp, mesh_fsdp, mesh_rep):
    _, _, _, target = setup()
    out = {}
    want = host(final_fsdp)
    with tempfile.TemporaryDirectory() as d, Checkpointer(d) as ckpt:
        ckpt.save(1, final_fsdp)  # saved from the sharded layout
        ckpt.wait()
        rep = ckpt.restore(target, mesh=mesh_rep).state
        out["sharded_to_replicated"] = {
            "equal": all(np.array_equal(v, want[k]) for k, v in host(rep).items()),
            "all_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(rep)),
        }
        # Into a sharded target (mesh=None: the target's own shardings).
        sharded_target = jt.shard_state(target, mesh_fsdp)
        back = ckpt.restore(sharded_target, mesh=None).state
        out["sharded_to_sharded_target"] = {
            "equal": all(np.array_equal(v, want[k]) for k, v in host(back).items()),
            "same_specs": specs(back) == specs(sharded_target),
        }
    with tempfile.TemporaryDirectory() as d, Checkpointer(d) as ckpt:
        replicated = jt.replicate(final_fsdp, mesh_rep)
        ckpt.save(1, replicated)  # saved from the replicated layout
        ckpt.wait()
        sh = ckpt.restore(target, mesh=mesh_fsdp).state
        out["replicated_to_sharded"] = {
            "equal": all(np.array_equal(v, want[k]) for k, v in host(sh).items()),
            "specs": specs(sh),
        }
    return out


def main():
    assert jax.device_count() == 8
    mesh_rep = jt.data_mesh()
    mesh_fsdp = jt.make_mesh(fsdp=8)
    mesh_mixed = jt.make_mesh(data=2, fsdp=4)
    rep = run(mesh_rep)
    fsdp = run(mesh_fsdp)
    mixed = run(mesh_mixed)
    fused = run(mesh_mixed, steps_per_call=4)
    ckpt = checkpoints(fsdp["final_state"], mesh_fsdp, mesh_rep)
    epoch_rep, _, _ = device_epoch(mesh_rep)
    epoch_mixed, epoch_traces, epoch_layout = device_epoch(mesh_mixed)
    epoch = {
        "params_max_abs_diff": max(
            float(np.max(np.abs(epoch_mixed[k] - v))) for k, v in epoch_rep.items()
        ),
        "trace_count": epoch_traces,
        "final_matches_rule": epoch_layout,
    }
    ref_params = host(rep["final_state"].params)
    for r in (fsdp, mixed, fused):
        got = host(r["final_state"].params)
        r["params_max_abs_diff"] = max(
            float(np.max(np.abs(got[k] - v))) for k, v in ref_params.items()
        )
    for r in (rep, fsdp, mixed, fused):
        r.pop("final_state")
    errors = {}
    for name, kwargs in (("fsdp3", {"fsdp": 3}), ("product", {"data": 3, "fsdp": 2})):
        try:
            jt.make_mesh(**kwargs)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    try:
        jt.shard_batch({"x": np.zeros((20, 3), np.float32)}, mesh_mixed)
        errors["batch20"] = None
    except ValueError as e:
        errors["batch20"] = str(e)
    result = {
        "mesh_shapes": [dict(m.shape) for m in (mesh_fsdp, mesh_mixed)],
        "replicated": rep,
        "fsdp": fsdp,
        "mixed": mixed,
        "fused": fused,
        "checkpoint": ckpt,
        "device_epoch": epoch,
        "train_command": train_command(),
        "errors": errors,
    }
    print("RESULT:" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
