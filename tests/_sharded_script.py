"""Run by tests/test_sharded.py: sharded checkpoints across 2 processes x 4 CPU devices.

``PHASE PORT PROCESS_ID OUT`` joins a 2-process run on 127.0.0.1:PORT (gloo, 4 virtual
devices per process, set by the parent through XLA_FLAGS) and trains an MLP with Adam,
FSDP over all 8 devices, its state created sharded (`init_sharded`):

* ``full``: 12 steps, checkpoints every 4 into OUT/full; then the save-memory check: a
  state of ~384 MB created sharded and saved, this process's peak RSS increase during
  the save (and, for comparison, during a gather of the whole state to the host).
* ``killed``: the same run into OUT/ckpt; after checkpoint 8 is committed it writes
  OUT/paused.PID and waits to be SIGKILLed.
* ``resume``: resumes OUT/ckpt to step 12, then restores that checkpoint onto a
  data=2 x fsdp=4 mesh.

``single OUT`` (1 process, 1 device) restores OUT/ckpt's newest step onto one device.
Each process prints one ``RESULT:`` JSON line; process 0 writes the final parameters
to OUT/PHASE.npz.
"""

import json
import os
import resource
import sys
import time

import jax
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss, init_model
from jaxtrain.checkpoint import Checkpointer, leaf_name
from jaxtrain.data import load_digits
from jaxtrain.parallel import init_sharded, make_mesh, state_shardings

NUM_STEPS = 12
SAVE_EVERY = 4
PAUSE_AT = 8
BATCH = 64
MODEL = jt.models.MLP(hidden=(512, 512), num_outputs=10)
BIG = (4096, 4096)  # two such float32 kernels + Adam's two moments: 384 MiB in all


def create():
    model = jt.from_linen(MODEL)
    params, model_state = init_model(model, 0, np.zeros((1, 64), np.float32))
    return jt.TrainState.create(params, optax.adam(1e-3), 0, model_state)


def gathered(tree):
    """Whole host copies (small test states only: the library itself never gathers)."""
    from jax.experimental import multihost_utils

    return {
        leaf_name(p): np.asarray(
            multihost_utils.process_allgather(x, tiled=True) if not x.is_fully_addressable else x
        )
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


class PauseAfter(jt.Callback):
    """After checkpoint PAUSE_AT is committed: mark it, then wait for SIGKILL."""

    def __init__(self, ckpt, marker):
        self.ckpt, self.marker = ckpt, marker

    def on_call_end(self, loop):
        if loop.step == PAUSE_AT:
            self.ckpt.wait()
            with open(self.marker, "w") as f:
                f.write(str(loop.step))
            time.sleep(3600)


def train(mesh, ckpt_dir, resume=False, callbacks=()):
    train_data, _ = load_digits()
    model = jt.from_linen(MODEL)
    optimizer = optax.adam(1e-3)
    step = jt.make_train_step(classification_loss(model), optimizer, mesh=mesh)
    state = init_sharded(create, mesh)
    ckpt = Checkpointer(ckpt_dir, keep_last=5)
    cbs = [cb(ckpt) for cb in callbacks]
    with ckpt:
        final, history = jt.fit(
            state,
            step,
            jt.ArrayDataset(train_data, BATCH, seed=0),
            num_steps=NUM_STEPS,
            log_every=4,
            checkpointer=ckpt,
            save_every=SAVE_EVERY,
            resume=resume,
            progress=False,
            callbacks=cbs,
        )
    return final, history, step, ckpt


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak():
    """Resets VmHWM (Linux: writing 5 to clear_refs), so the peak of what follows is seen."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_increase(fn):
    """(bytes the process's peak RSS rose above its RSS before ``fn``, fn's result)."""
    import gc

    gc.collect()
    _reset_peak()
    before = _vm("VmRSS")
    out = fn()
    return _vm("VmHWM") - before, out


def memory_check(mesh, out):
    """Peak RSS increase of a sharded save of a ~384 MiB state, and of a host gather."""
    import jax.numpy as jnp

    def create_big():
        k1, k2 = jax.random.split(jax.random.key(1))
        params = {
            "a": jax.random.normal(k1, BIG, jnp.float32),
            "b": jax.random.normal(k2, BIG, jnp.float32),
        }
        return jt.TrainState.create(params, optax.adam(1e-3), 0, copy=False)

    big = init_sharded(create_big, mesh)
    jax.block_until_ready(big)
    total = sum(x.nbytes for x in jax.tree.leaves(big) if hasattr(x, "nbytes"))
    with Checkpointer(os.path.join(out, "big"), keep_last=1) as ckpt:
        ckpt.save(0, big)  # warm-up: compiles the digests, starts orbax's threads
        ckpt.wait()

        def save():
            ckpt.save(1, big)
            ckpt.wait()
            return ckpt.save_blocking_seconds[-1]

        save_peak, blocking = peak_increase(save)
    gather_peak, _ = peak_increase(lambda: gathered(big))
    ok = all(
        s.sharding.is_equivalent_to(w, s.ndim)
        for s, w in zip(
            jax.tree.leaves(big), jax.tree.leaves(state_shardings(big, mesh)), strict=True
        )
    )
    return {
        "state_bytes": int(total),
        "save_peak_increase": int(save_peak),
        "gather_peak_increase": int(gather_peak),
        "save_blocking_seconds": blocking,
        "big_is_fsdp": ok,
    }


def worker(phase, port, pid, out):
    info = jt.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
    mesh = make_mesh(fsdp=8)
    result = {"process_index": info.process_index, "device_count": info.device_count}
    if phase == "killed":
        marker = os.path.join(out, f"paused.{pid}")
        pause = [lambda c: PauseAfter(c, marker)]
        train(mesh, os.path.join(out, "ckpt"), callbacks=pause)
        raise AssertionError("the killed run was not killed")
    ckpt_dir = os.path.join(out, "full" if phase == "full" else "ckpt")
    final, history, step, ckpt = train(mesh, ckpt_dir, resume=phase == "resume")
    leaf = final.params["Dense_0"]["kernel"]
    result.update(
        losses=[r["loss"] for r in history.train],
        trace_count=step.trace_count,
        kernel_spec=[str(a) for a in leaf.sharding.spec],
        kernel_local_fraction=sum(s.data.size for s in leaf.addressable_shards) / leaf.size,
        steps=Checkpointer(ckpt_dir).all_steps(),
        blocking=ckpt.save_blocking_seconds,
    )
    params = gathered(final.params)
    if phase == "resume":  # the same checkpoint onto data=2 x fsdp=4
        mesh24 = make_mesh(data=2, fsdp=4)
        with Checkpointer(ckpt_dir) as c:
            restored = c.restore(init_sharded(create, mesh24), mesh=mesh24)
        got = gathered(restored.state.params)
        r_leaf = restored.state.params["Dense_0"]["kernel"]
        result["data2_fsdp4"] = {
            "step": restored.step,
            "mesh": dict(r_leaf.sharding.mesh.shape),
            "spec": [str(a) for a in r_leaf.sharding.spec],
            "equal": all(np.array_equal(got[k], params[k]) for k in params),
        }
    if phase == "full":
        # Placing an eagerly created (process-local) state on the global mesh slices each
        # leaf on its device: it never fetches a whole leaf to the host (the transfer
        # guard cannot see that on CPU, where device_get copies nothing: refuse the call).
        eager = create()
        real_get = jax.device_get

        def refuse(*args, **kwargs):
            raise AssertionError("shard_state fetched a whole leaf to the host")

        jax.device_get = refuse
        try:
            placed = jt.shard_state(eager, mesh)
        finally:
            jax.device_get = real_get
        made = init_sharded(create, mesh)
        pairs = [(placed.params, made.params), (placed.opt_state, made.opt_state)]
        result["placed_like_init_sharded"] = all(
            np.array_equal(x, y)
            for a, b in pairs
            for x, y in zip(gathered(a).values(), gathered(b).values(), strict=True)
        )
        result["memory"] = memory_check(mesh, out)
    if info.is_primary:
        np.savez(os.path.join(out, f"{phase}.npz"), **params)
    print("RESULT:" + json.dumps(result), flush=True)
    jt.distributed.shutdown()


def single(out):
    mesh = jt.data_mesh(jax.devices()[:1])
    target = create()
    with Checkpointer(os.path.join(out, "ckpt")) as ckpt:
        restored = ckpt.restore(target, mesh=mesh)
    got = gathered(restored.state.params)
    full = dict(np.load(os.path.join(out, "full.npz")))
    leaf = restored.state.params["Dense_0"]["kernel"]
    print(
        "RESULT:"
        + json.dumps(
            {
                "step": restored.step,
                "devices": len(leaf.sharding.device_set),
                "equal_full": all(np.array_equal(got[k], full[k]) for k in full),
                "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if sys.argv[1] == "single":
        single(sys.argv[2])
    else:
        worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
