"""A population trained by `fit` with checkpoints, for the SIGKILL test (test_population_fit).

Usage: ``python tests/_population_kill_script.py OUT MODE`` with MODE ``full`` (train to
the end), ``pause:N`` (after the N-th call and a checkpoint, print ``PAUSED`` and wait to
be killed) or ``resume`` (continue from OUT's newest checkpoint). Prints one ``RESULT:``
line: the final state's digest and the train records without timings.
"""

import hashlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxtrain as jt
from jaxtrain import population as pop
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.population_step import make_population_step
from jaxtrain.writers import json_safe


def loss_fn(params, batch, smooth=0.0):
    y = jax.nn.one_hot(batch["y"], 3) * (1 - smooth) + smooth / 3
    return jnp.mean(-jnp.sum(y * jax.nn.log_softmax(batch["x"] @ params["w"]), -1))


class Pause(jt.Callback):
    """After the n-th call (and its checkpoint): say so, then wait for SIGKILL."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def on_call_end(self, loop):
        self.calls += 1
        if self.calls == self.n:
            print("PAUSED", flush=True)
            time.sleep(3600)


out, mode = sys.argv[1], sys.argv[2]
opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
rs = np.random.RandomState(0)
x = rs.randn(64, 5).astype(np.float32)
data = jt.ArrayDataset({"x": x, "y": (x[:, 0] > 0).astype(np.int32)}, 16)
p0 = pop.create(
    lambda k: {"w": jax.random.normal(k, (5, 3)) * 0.1},
    opt,
    [0, 1, 2],
    hparams={"learning_rate": [1e-3, 1e-2, 1e-1]},
    loss_hparams={"smooth": [0.0, 0.1, float("nan")]},  # member 2 diverges: frozen, saved
)
step = make_population_step(loss_fn, opt, steps_per_call=2)
callbacks = [Pause(int(mode.split(":")[1]))] if mode.startswith("pause") else []
with Checkpointer(out) as ck:
    state, h = jt.fit(
        p0, step, data, epochs=3, log_every=3, save_every=2, checkpointer=ck,
        resume=mode == "resume", progress=False, callbacks=callbacks,
    )  # fmt: skip
records = [{k: v for k, v in r.items() if k != "examples_per_second"} for r in h.train]
digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in jax.tree.leaves(state)))
print("RESULT:" + json.dumps({"digest": digest.hexdigest(), "train": json_safe(records)}))
