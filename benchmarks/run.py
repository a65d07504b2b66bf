"""Side-by-side training-step benchmark: jaxtrain against hand-written JAX, Flax and PyTorch.

One command measures every contender in ONE process, interleaved (round-robin within each
repeat, the starting contender rotated from repeat to repeat), after a warm-up, and
prints the machine, the versions, a markdown table of medians (with min-max and the
interquartile range) and the goals of issue #5 with MET / MISSED. It also writes
everything to a JSON file.

    python benchmarks/run.py                       # full size (about 10 min on 2 CPU cores)
    python benchmarks/run.py --size tiny           # smoke size (the test suite runs this)
    python benchmarks/run.py --models mlp64 --repeats 9 --out runs/bench.json
    python benchmarks/run.py --population only     # only the population section (issue #14)

Fair play, for every contender: the same model (the same initial weights: PyTorch and
Flax NNX models are loaded from the linen parameters), Adam(1e-3) with the same
hyperparameters, the same batches (the digits data from `jaxtrain.data.load_digits`, served by
`jaxtrain.ArrayDataset(batch_size=128, seed=0, drop_remainder=True)`, so every batch is
full), the same number of steps and the same loss (mean softmax cross-entropy). Batches
are built before timing (JAX: already on the device; PyTorch: tensors) so the data
pipeline is outside the measurement for everyone; `fit` on vs off is measured separately
with its own host-fed pipeline. Each timed section ends by blocking on its results
(``jax.block_until_ready``; PyTorch on CPU is synchronous), and a time is wall time per
step. Each contender is written the way its documentation shows: Flax NNX with
``nnx.Optimizer`` inside an ``nnx.jit`` step (and Flax's own faster
``nnx.cached_partial`` variant), Flax linen with ``flax.training.train_state.TrainState``
and ``jax.jit``, PyTorch with ``zero_grad`` / ``backward`` / ``step`` (default Adam, and
``Adam(fused=True)``), and ``torch.compile(model)`` in its default mode. PyTorch uses as
many intra-op threads as the cores JAX's CPU backend uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

LEARNING_RATE = 1e-3
BATCH_SIZE = 128

# The models (see `linen_module`). Full-size steps (`SIZES`) are sized so a full run (3
# models, 11 contenders, 5 repeats, warm-up, compilations, the compile-cache subprocesses
# and fit on/off) stays near 10 minutes on a 2-core CPU, with at least a few hundred
# milliseconds per timed section.
MODEL_NAMES = ("mlp64", "mlp512", "cnn")

# The contenders in table order: key -> label.
CONTENDERS: dict[str, str] = {
    "jt_step": "jaxtrain `train_step` per step (Python loop)",
    "jt_step_nonorm": "jaxtrain `train_step`, `grad_norm=False`",
    "jt_fused": "jaxtrain `make_train_steps` (K steps per call)",
    "jt_fused_unroll": "jaxtrain `make_train_steps(unroll=True)`",
    "jt_epoch": "jaxtrain `make_device_epoch` (1 epoch per call, data on device)",
    "jax_jit": "hand-written `jax.jit` step loop (dispatch floor)",
    "jax_scan": "hand-written `lax.scan`, K steps per call (compute floor)",
    "jax_scan_unroll": "hand-written `lax.scan(unroll=True)`, K steps per call",
    "linen": "Flax linen `TrainState` + `jax.jit`",
    "nnx": "Flax NNX `nnx.Optimizer` + `nnx.jit`",
    "nnx_cached": "Flax NNX `nnx.cached_partial` (Flax's fast path)",
    "torch_eager": "PyTorch eager (default Adam)",
    "torch_fused": "PyTorch eager (`Adam(fused=True)`)",
    "torch_compile": "PyTorch `torch.compile(model)` (default mode)",
}

SIZES = {
    # Steps per timed section (per model), repeats, warm-up sections. The CNN gets one
    # epoch: on XLA's CPU backend its step inside a lax.scan (the fused, device-resident
    # and hand-written scan contenders alike) runs about 25x slower than the same step
    # jitted alone, so three of its contenders take about a second per step.
    "full": {"steps": {"mlp64": 440, "mlp512": 88, "cnn": 11}, "repeats": 5, "warmup": 1},
    "tiny": {"steps": {"mlp64": 11, "mlp512": 11, "cnn": 11}, "repeats": 1, "warmup": 1},
}


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, OS and load: what a reader needs to judge a time."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "loadavg_1m_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def versions_info() -> dict[str, str]:
    """Versions of Python and every framework measured ("missing" when not installed)."""
    import flax
    import jax
    import jaxlib
    import optax

    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = "missing"
    from jaxtrain import __version__

    out["jaxtrain"] = __version__
    return out


# --------------------------------------------------------------------------- models


def linen_module(name: str):
    """The linen module of a benchmark model (jaxtrain's built-in MLP / CNN)."""
    import jaxtrain as jt

    if name == "mlp64":
        return jt.models.MLP(hidden=(64, 64), num_outputs=10)  # 64 -> 64 -> 64 -> 10
    if name == "mlp512":
        return jt.models.MLP(hidden=(512, 512), num_outputs=10)
    if name == "cnn":
        # The built-in CNN (channels 32, 64; dense 128) without dropout: dropout would make
        # every contender draw random numbers with its own generator (threefry vs
        # Philox), which is not the work being compared.
        return jt.models.CNN(dropout=0.0)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}.")


def model_description(name: str) -> str:
    return {
        "mlp64": "tiny MLP 64-64-64-10",
        "mlp512": "MLP 64-512-512-10",
        "cnn": "CNN 32-32/64-64 + 128 (built-in, no dropout)",
    }[name]


def nnx_model(name: str, params: dict):
    """A Flax NNX twin of the linen model, loaded with the same parameters ``params``."""
    import jax.numpy as jnp
    from flax import nnx

    rngs = nnx.Rngs(0)
    # Zeros, overwritten at once by `load`: cheaper than drawing random weights op by op.
    zeros = {
        "kernel_init": nnx.initializers.zeros_init(),
        "bias_init": nnx.initializers.zeros_init(),
    }
    module = linen_module(name)

    def load(layer, p):
        for attr in ("kernel", "bias"):
            var, value = getattr(layer, attr), jnp.array(p[attr])
            if hasattr(var, "set_value"):  # flax >= 0.12 (the `.value` setter is deprecated)
                var.set_value(value)
            else:
                var.value = value
        return layer

    if name in ("mlp64", "mlp512"):

        class NnxMLP(nnx.Module):
            def __init__(self):
                widths = [64, *module.hidden, module.num_outputs]
                self.n = len(widths) - 1
                for i in range(self.n):
                    lin = nnx.Linear(widths[i], widths[i + 1], rngs=rngs, **zeros)
                    setattr(self, f"dense_{i}", load(lin, params[f"Dense_{i}"]))

            def __call__(self, x):
                x = x.reshape((x.shape[0], -1))
                for i in range(self.n):
                    x = getattr(self, f"dense_{i}")(x)
                    if i < self.n - 1:
                        x = nnx.relu(x)
                return x

        return NnxMLP()

    class NnxCNN(nnx.Module):
        def __init__(self):
            c_in, i = 1, 0
            for c in module.channels:
                for _ in range(2):
                    conv = nnx.Conv(c_in, c, (3, 3), padding="SAME", rngs=rngs, **zeros)
                    setattr(self, f"conv_{i}", load(conv, params[f"Conv_{i}"]))
                    c_in, i = c, i + 1
            self.n_conv = i
            flat = c_in * (8 // 2 ** len(module.channels)) ** 2
            self.dense_0 = load(
                nnx.Linear(flat, module.dense, rngs=rngs, **zeros), params["Dense_0"]
            )
            self.dense_1 = load(
                nnx.Linear(module.dense, module.num_classes, rngs=rngs, **zeros), params["Dense_1"]
            )

        def __call__(self, x):
            for i in range(self.n_conv):
                x = nnx.relu(getattr(self, f"conv_{i}")(x))
                if i % 2 == 1:
                    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape((x.shape[0], -1))
            return self.dense_1(nnx.relu(self.dense_0(x)))

    return NnxCNN()


# --------------------------------------------------------------------------- contenders


@dataclasses.dataclass
class Contender:
    """One way of running the same S training steps.

    ``prepare()`` builds everything and returns ``run``, which runs one timed section (S
    steps), blocks on its results and returns the loss of its last step (a scalar
    array, read only after the clock stops). An exception in ``prepare`` or
    the warm-up of an optional contender (PyTorch) makes it "unavailable: <reason>"
    instead of ending the benchmark.
    """

    key: str
    prepare: Callable[[], Callable[[], Any]]
    optional: bool = False
    run: Callable[[], Any] | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    status: str = "ok"
    warmup_s: float | None = None  # prepare + warm-up: compilation, mostly
    final_loss: float | None = None  # after warm-up + all repeats: same for everyone

    @property
    def label(self) -> str:
        return CONTENDERS.get(self.key, self.key)


def ce_loss(logits, labels):
    """Mean softmax cross-entropy: the loss every contender minimises."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def jaxtrain_loss(module) -> Callable:
    """jaxtrain's loss for ``module``: the plain documented form ``loss_fn(params, batch)``
    around the same `ce_loss` the hand-written steps differentiate, so a ratio measures
    the library, not the loss."""
    import jaxtrain as jt

    model = jt.from_linen(module)

    def loss_fn(params, batch):
        logits, _ = model.apply(params, {}, batch["x"], train=True)
        return ce_loss(logits, batch["y"])

    return loss_fn


@dataclasses.dataclass
class Workload:
    """One model's data, initial parameters and step count, shared by all contenders."""

    name: str
    module: Any
    params0: dict
    dataset: Any  # jaxtrain.ArrayDataset (drop_remainder: every batch full)
    steps: int
    k: int
    host_batches: list  # S numpy batch dicts: epochs 0, 1, ... of `dataset`

    def fresh_params(self):
        """A private copy of the initial parameters (donating steps consume theirs)."""
        import jax
        import jax.numpy as jnp

        return jax.tree.map(lambda a: jnp.array(a, copy=True), self.params0)


def make_workload(name: str, steps: int, k: int, train: dict) -> Workload:
    import jax
    import jax.numpy as jnp

    import jaxtrain as jt

    module = linen_module(name)
    model = jt.from_linen(module)
    # One compiled init instead of op-by-op dispatch (seconds for the CNN on a CPU).
    params0, _ = jax.jit(model.init)(jax.random.key(0), jnp.asarray(train["x"][:1]))
    dataset = jt.ArrayDataset(train, BATCH_SIZE, seed=0, drop_remainder=True)
    per_epoch = dataset.steps_per_epoch
    epochs = steps // per_epoch
    host = [b for e in range(epochs) for b in dataset.batches(e)]
    assert len(host) == steps
    return Workload(name, module, params0, dataset, steps, k, host)


def jax_contenders(w: Workload) -> list[Contender]:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxtrain as jt
    from jaxtrain.resident import put_dataset

    tx = optax.adam(LEARNING_RATE)
    module = w.module
    dev_batches = [jax.device_put(b) for b in w.host_batches]

    def stacked(k: int) -> list[dict]:
        return [
            jax.tree.map(lambda *xs: jnp.stack(xs), *dev_batches[i : i + k])
            for i in range(0, w.steps, k)
        ]

    loss_fn = jaxtrain_loss(module)

    def jt_step(**kwargs):
        step = jt.make_train_step(loss_fn, tx, **kwargs)
        box = {"state": jt.TrainState.create(w.fresh_params(), tx, 0)}

        def run():
            state = box["state"]
            for b in dev_batches:
                state, metrics = step(state, b)
            box["state"] = state
            return jax.block_until_ready((state, metrics))[1]["loss"]

        run.compiled = step  # for the one-compilation check
        return run

    def jt_fused(**kwargs):
        steps = jt.make_train_steps(loss_fn, tx, steps_per_call=w.k, **kwargs)
        groups = stacked(w.k)
        box = {"state": jt.TrainState.create(w.fresh_params(), tx, 0)}

        def run():
            state = box["state"]
            for g in groups:
                state, metrics = steps(state, g)
            box["state"] = state
            return jax.block_until_ready((state, metrics))[1]["loss"][-1]

        run.compiled = steps
        return run

    def jt_epoch():
        run_epoch = jt.make_device_epoch(loss_fn, tx, w.dataset)
        arrays = put_dataset(w.dataset)
        epochs = [jnp.int32(e) for e in range(w.steps // w.dataset.steps_per_epoch)]
        box = {"state": jt.TrainState.create(w.fresh_params(), tx, 0)}

        def run():
            state = box["state"]
            for e in epochs:
                state, metrics = run_epoch(state, arrays, e)
            box["state"] = state
            return jax.block_until_ready((state, metrics))[1]["loss"][-1]

        run.compiled = run_epoch
        return run

    def hand_update(params, opt_state, batch):
        def objective(p):
            return ce_loss(module.apply({"params": p}, batch["x"]), batch["y"])

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def jax_jit():
        # Donated like jaxtrain's step, so the ratio isolates jaxtrain's own overhead.
        step = jax.jit(hand_update, donate_argnums=(0, 1))
        params = w.fresh_params()
        box = {"p": params, "o": tx.init(params)}

        def run():
            p, o = box["p"], box["o"]
            for b in dev_batches:
                p, o, loss = step(p, o, b)
            box["p"], box["o"] = p, o
            return jax.block_until_ready((p, o, loss))[2]

        return run

    def jax_scan(unroll=1):
        def k_steps(params, opt_state, batches):
            def body(carry, batch):
                p, o, loss = hand_update(*carry, batch)
                return (p, o), loss

            (params, opt_state), losses = jax.lax.scan(
                body, (params, opt_state), batches, unroll=unroll
            )
            return params, opt_state, losses

        steps = jax.jit(k_steps, donate_argnums=(0, 1))
        groups = stacked(w.k)
        params = w.fresh_params()
        box = {"p": params, "o": tx.init(params)}

        def run():
            p, o = box["p"], box["o"]
            for g in groups:
                p, o, losses = steps(p, o, g)
            box["p"], box["o"] = p, o
            return jax.block_until_ready((p, o, losses))[2][-1]

        return run

    def linen():
        from flax.training import train_state

        state0 = train_state.TrainState.create(
            apply_fn=module.apply, params=w.fresh_params(), tx=optax.adam(LEARNING_RATE)
        )

        # As in Flax's quick start: jax.jit on (state, batch), no donation.
        @jax.jit
        def train_step(state, batch):
            def objective(params):
                logits = state.apply_fn({"params": params}, batch["x"])
                return ce_loss(logits, batch["y"])

            loss, grads = jax.value_and_grad(objective)(state.params)
            return state.apply_gradients(grads=grads), loss

        box = {"state": state0}

        def run():
            state = box["state"]
            for b in dev_batches:
                state, loss = train_step(state, b)
            box["state"] = state
            return jax.block_until_ready((state, loss))[1]

        return run

    def nnx_step_fn():
        from flax import nnx

        net = nnx_model(w.name, w.fresh_params())
        optimizer = nnx.Optimizer(net, optax.adam(LEARNING_RATE), wrt=nnx.Param)

        # As in Flax's NNX MNIST tutorial: the optimizer update inside the nnx.jit step.
        @nnx.jit
        def train_step(model, optimizer, x, y):
            def objective(model):
                return ce_loss(model(x), y)

            loss, grads = nnx.value_and_grad(objective)(model)
            optimizer.update(model, grads)
            return loss

        return nnx, net, optimizer, train_step

    xy = [(b["x"], b["y"]) for b in dev_batches]

    def nnx_plain():
        nnx, net, optimizer, train_step = nnx_step_fn()

        def run():
            for x, y in xy:
                loss = train_step(net, optimizer, x, y)
            return jax.block_until_ready((loss, nnx.state(net)))[0]

        return run

    def nnx_cached():
        nnx, net, optimizer, train_step = nnx_step_fn()
        # Flax's performance guide: cache the graph traversal of (model, optimizer).
        cached = nnx.cached_partial(train_step, net, optimizer)

        def run():
            for x, y in xy:
                loss = cached(x, y)
            return jax.block_until_ready((loss, nnx.state(net)))[0]

        return run

    out = [
        Contender("jt_step", jt_step),
        Contender("jt_step_nonorm", lambda: jt_step(grad_norm=False)),
        Contender("jt_fused", jt_fused),
        Contender("jt_fused_unroll", lambda: jt_fused(unroll=True)),
        Contender("jt_epoch", jt_epoch),
        Contender("jax_jit", jax_jit),
        Contender("jax_scan", jax_scan),
        Contender("jax_scan_unroll", lambda: jax_scan(unroll=True)),
        Contender("linen", linen),
        Contender("nnx", nnx_plain),
    ]
    from flax import nnx as _nnx

    if hasattr(_nnx, "cached_partial"):
        out.append(Contender("nnx_cached", nnx_cached))
    return out


def torch_contenders(w: Workload, threads: int) -> list[Contender]:
    def unavailable(reason: str) -> Callable:
        def prepare():
            raise RuntimeError(reason)

        return prepare

    try:
        import torch
        import torch.nn.functional as F

        from jaxtrain.contrast.convert import nhwc_to_nchw
    except ImportError as e:
        reason = f"torch not installed ({e})"
        return [
            Contender(k, unavailable(reason), optional=True)
            for k in ("torch_eager", "torch_fused", "torch_compile")
        ]

    torch.set_num_threads(threads)
    batches = [
        (
            torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(b["x"]))),
            torch.from_numpy(b["y"].astype(np.int64)),
        )
        for b in w.host_batches
    ]

    def twin():
        return torch_model(w.name, w.params0).train()

    def loop(net, opt):
        def run():
            for x, y in batches:
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
            return loss.detach()  # CPU ops are synchronous: the section is done here

        return run

    def eager():
        net = twin()
        return loop(net, torch.optim.Adam(net.parameters(), lr=LEARNING_RATE))

    def fused():
        net = twin()
        return loop(net, torch.optim.Adam(net.parameters(), lr=LEARNING_RATE, fused=True))

    def compiled():
        net = twin()
        opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        return loop(torch.compile(net), opt)

    return [
        Contender("torch_eager", eager, optional=True),
        Contender("torch_fused", fused, optional=True),
        Contender("torch_compile", compiled, optional=True),
    ]


def torch_model(name: str, params: dict):
    """The PyTorch twin of the linen model (`jaxtrain.contrast.torch_twin`: the same
    layers, NCHW), loaded with the same parameters ``params``."""
    import jax

    from jaxtrain.contrast.convert import from_torch, torch_twin

    net = torch_twin(linen_module(name), (1, 8, 8))
    from_torch(net, (1, 8, 8)).load_into(net, jax.tree.map(np.asarray, params))
    return net


# --------------------------------------------------------------------------- measuring


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:200]


def measure(contenders: list[Contender], steps: int, repeats: int, warmup: int) -> None:
    """Prepares and warms up every contender, then times them interleaved.

    Round-robin within each repeat (every contender once), starting one contender later
    in each repeat, so slow drifts of a shared machine spread over all of them.
    """
    for c in contenders:
        t0 = time.perf_counter()
        try:
            c.run = c.prepare()
            for _ in range(warmup):
                c.run()  # compiles (JAX, torch.compile) and warms caches
            c.warmup_s = time.perf_counter() - t0
        except Exception as e:
            if not c.optional:
                raise
            c.status = f"unavailable: {one_line(e)}"
            c.run = None
            print(f"[{c.key}] {c.status}", file=sys.stderr)
            if os.environ.get("JAXTRAIN_BENCH_DEBUG"):
                traceback.print_exc()
    live = [c for c in contenders if c.run is not None]
    for r in range(repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for c in order:
            gc.collect()  # every section starts with the same (empty) garbage
            t0 = time.perf_counter()
            try:
                loss = c.run()
            except Exception as e:
                if not c.optional:
                    raise
                c.status, c.run = f"unavailable: {one_line(e)}", None
                live.remove(c)
                continue
            c.times.append((time.perf_counter() - t0) / steps)
            c.final_loss = None if loss is None else float(loss)


def stats(times: list[float]) -> dict[str, float] | None:
    if not times:
        return None
    q = np.percentile(times, [25, 75]) if len(times) > 1 else (times[0], times[0])
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "q25_s": float(q[0]),
        "q75_s": float(q[1]),
        "repeats": len(times),
    }


def memory_analysis(w: Workload) -> dict[str, Any]:
    """Compiled memory analysis of jaxtrain's train step, with and without donation."""
    import jax
    import optax

    import jaxtrain as jt
    from jaxtrain.contrast.anatomy import normalize_memory_analysis

    tx = optax.adam(LEARNING_RATE)
    loss_fn = jaxtrain_loss(w.module)

    state = jt.TrainState.create(w.fresh_params(), tx, 0)
    batch = jax.device_put(w.host_batches[0])
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    out: dict[str, Any] = {"state_bytes": state_bytes}
    for donate in (True, False):
        step = jt.make_train_step(loss_fn, tx, donate=donate)
        try:
            mem = normalize_memory_analysis(step.lower(state, batch).compile().memory_analysis())
        except Exception as e:  # some backends give none
            out["donated" if donate else "not_donated"] = {"error": one_line(e)}
            continue
        arg = mem.get("argument_size_in_bytes", 0)
        res = mem.get("output_size_in_bytes", 0)
        alias = mem.get("alias_size_in_bytes", 0)
        temp = mem.get("temp_size_in_bytes", 0)
        mem["peak_estimate_bytes"] = arg + res - alias + temp
        out["donated" if donate else "not_donated"] = mem
    return out


FIRST_STEP_FLAG = "--_first-step"


def first_step_child(name: str, cache_dir: str) -> None:
    """In a fresh process: time from building jaxtrain's step to its first result."""
    import jax

    from jaxtrain.compile_cache import enable_compilation_cache

    enable_compilation_cache(cache_dir)
    import jax.numpy as jnp
    import optax

    import jaxtrain as jt
    from jaxtrain.data import load_digits

    train, _ = load_digits()
    w = make_workload(
        name, jt.ArrayDataset(train, BATCH_SIZE, drop_remainder=True).steps_per_epoch, 1, train
    )
    tx = optax.adam(LEARNING_RATE)
    loss_fn = jaxtrain_loss(w.module)

    state = jt.TrainState.create(w.fresh_params(), tx, 0)
    batch = jax.device_put(w.host_batches[0])
    jax.block_until_ready((state, batch, jnp.zeros(())))
    t0 = time.perf_counter()
    step = jt.make_train_step(loss_fn, tx)
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    print(json.dumps({"first_step_s": time.perf_counter() - t0}))


def first_step_cold_warm(name: str) -> dict[str, Any]:
    """Two fresh processes sharing one new cache folder: the first compiles, the second
    loads the compiled step from JAX's persistent compilation cache."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="jaxtrain-bench-cache-") as cache:
        for which in ("cold", "warm"):
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, os.path.abspath(__file__), FIRST_STEP_FLAG, name, cache],
                capture_output=True,
                text=True,
                timeout=600,
            )
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                raise RuntimeError(
                    f"first-step subprocess ({which}, {name}) failed:\n{res.stderr[-2000:]}"
                )
            out[f"{which}_s"] = json.loads(res.stdout.strip().splitlines()[-1])["first_step_s"]
            out[f"{which}_process_s"] = wall
        out["cache_files"] = sum(len(files) for _, _, files in os.walk(cache))
    out["speedup"] = out["cold_s"] / out["warm_s"]
    return out


def fit_on_off(w: Workload, repeats: int, warmup: int) -> dict[str, Any]:
    """`fit` with logging (every 10 steps, a JSONL writer) and the progress bar, vs
    without (no bar, no periodic logging, no writer), interleaved like the contenders."""
    import optax

    import jaxtrain as jt
    from jaxtrain.writers import JsonlWriter

    tx = optax.adam(LEARNING_RATE)
    loss_fn = jaxtrain_loss(w.module)

    step = jt.make_train_step(loss_fn, tx)
    # fit copies the state it is given, so one template serves every call.
    state0 = jt.TrainState.create(w.fresh_params(), tx, 0)
    tmp_dir = tempfile.TemporaryDirectory(prefix="jaxtrain-bench-fit-")
    tmp = tmp_dir.name

    def variant(on: bool):
        def prepare():
            def run():
                writers = [JsonlWriter(os.path.join(tmp, "metrics.jsonl"))] if on else []
                try:
                    jt.fit(
                        state0,
                        step,
                        w.dataset,
                        num_steps=w.steps,
                        log_every=10 if on else 10**9,
                        progress=on,
                        writers=writers,
                    )
                finally:
                    for wr in writers:
                        wr.close()

            return run

        return prepare

    on, off = Contender("fit_on", variant(True)), Contender("fit_off", variant(False))
    with tmp_dir:
        measure([on, off], w.steps, repeats, warmup)
    return {
        "model": w.name,
        "steps": w.steps,
        "on": stats(on.times),
        "off": stats(off.times),
        "on_times_s": on.times,
        "off_times_s": off.times,
        "train_step_compilations": step.trace_count,
    }


# --------------------------------------------------------------------------- goals


def goals(results: dict[str, Any], fit: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each goal of issue #5 as ``{goal, model, ratio, op, target, result, detail}``.

    ``ratio`` is a ratio of medians, compared with ``target`` by ``op`` (``<=``, ``>=``
    or ``>``). Goals phrased "X n times faster than Y" use ``median(Y) / median(X)``;
    against PyTorch eager and Flax NNX the faster of their two variants is used, so a
    goal is never met against a slowed-down contender.
    """

    def med(model: str, key: str) -> float | None:
        c = results.get(model, {}).get("contenders", {}).get(key)
        return c.get("median_s") if c else None

    def best(model: str, *keys: str) -> tuple[float | None, str]:
        found = [(med(model, k), k) for k in keys if med(model, k)]
        return min(found) if found else (None, "")

    rows: list[dict[str, Any]] = []

    def add(goal, model, num, den, op, target, detail=""):
        row = {
            "goal": goal,
            "model": model,
            "ratio": None,
            "op": op,
            "target": target,
            "detail": detail,
        }
        if model is not None and model not in results:
            row.update(result="not measured", detail="model not selected")
        elif num is None or den is None:
            row.update(result="unavailable", detail=detail or "a contender is unavailable")
        else:
            ratio = num / den
            ok = {"<=": ratio <= target, ">=": ratio >= target, ">": ratio > target}[op]
            row.update(ratio=ratio, result="MET" if ok else "MISSED")
        rows.append(row)

    for m in MODEL_NAMES:
        add(
            "jaxtrain per-step / hand-written jax.jit",
            m,
            med(m, "jt_step"),
            med(m, "jax_jit"),
            "<=",
            1.05,
        )
    for m in MODEL_NAMES:
        add(
            "jaxtrain per-step with grad_norm=False / hand-written jax.jit",
            m,
            med(m, "jt_step_nonorm"),
            med(m, "jax_jit"),
            "<=",
            1.05,
            "not a goal of the issue: shows what the default grad_norm metric costs",
        )
    for m in MODEL_NAMES:
        add(
            "jaxtrain fused (K per call) / lax.scan floor (K per call)",
            m,
            med(m, "jt_fused"),
            med(m, "jax_scan"),
            "<=",
            1.10,
        )
        add(
            "jaxtrain fused unroll=True / lax.scan floor unroll=True",
            m,
            med(m, "jt_fused_unroll"),
            med(m, "jax_scan_unroll"),
            "<=",
            1.10,
        )
    if fit is None:
        rows.append(
            {
                "goal": "fit logging+progress on / off",
                "model": None,
                "ratio": None,
                "op": "<=",
                "target": 1.05,
                "result": "not measured",
                "detail": "--no-fit",
            }
        )
    else:
        add(
            "fit logging+progress on / off",
            fit["model"],
            fit["on"]["median_s"],
            fit["off"]["median_s"],
            "<=",
            1.05,
        )
    # "jaxtrain fused" against the peers: the faster of the rolled and the unrolled scan
    # (both are one documented option of make_train_steps), named in the detail.
    t, tk = best("mlp64", "torch_eager", "torch_fused")
    j, jk = best("mlp64", "jt_fused", "jt_fused_unroll")
    add(
        "PyTorch eager / jaxtrain fused (x faster)",
        "mlp64",
        t,
        j,
        ">=",
        4.0,
        f"PyTorch eager = faster of default/fused Adam: {tk}; jaxtrain: {jk}" if tk else "",
    )
    n, nk = best("mlp64", "nnx", "nnx_cached")
    add(
        "Flax NNX / jaxtrain fused (x faster)",
        "mlp64",
        n,
        j,
        ">=",
        8.0,
        f"NNX = faster of nnx.jit / cached_partial: {nk}; jaxtrain: {jk}" if nk else "",
    )
    for m in ("mlp512", "cnn"):
        t, tk = best(m, "torch_eager", "torch_fused")
        j, jk = best(m, "jt_fused", "jt_fused_unroll")
        add(
            "PyTorch eager / jaxtrain fused (x faster)",
            m,
            t,
            j,
            ">",
            1.0,
            f"faster of default/fused Adam: {tk}; jaxtrain: {jk}" if tk else "",
        )
        add(
            "torch.compile / jaxtrain fused (x faster)",
            m,
            med(m, "torch_compile"),
            j,
            ">",
            1.0,
            f"jaxtrain: {jk}" if jk else "",
        )
    return rows


# --------------------------------------------------------------------------- report


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def markdown(report: dict[str, Any]) -> str:
    models = list(report["models"])
    lines = []
    cfg = report["config"]
    lines.append(
        f"Per-step wall time, median over {cfg['repeats']} interleaved repeats "
        f"(min–max; IQR in the JSON), batch {BATCH_SIZE}, Adam({LEARNING_RATE:g}), "
        f"K = {cfg['k']} steps per fused call; steps per timed section: "
        + ", ".join(f"{m} {report['models'][m]['steps']}" for m in models)
        + "."
    )
    lines.append("")
    lines.append("| contender | " + " | ".join(model_description(m) for m in models) + " |")
    lines.append("|---|" + "---|" * len(models))
    for key, label in CONTENDERS.items():
        cells = []
        present = False
        for m in models:
            c = report["models"][m]["contenders"].get(key)
            if c is None:
                cells.append("—")
                continue
            present = True
            if c.get("median_s") is None:
                cells.append(c["status"])
            else:
                cells.append(
                    f"{fmt_time(c['median_s'])} ({fmt_time(c['min_s'])}–{fmt_time(c['max_s'])})"
                )
        if present:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for m in models:
        losses = [
            c["final_loss"]
            for c in report["models"][m]["contenders"].values()
            if c.get("final_loss") is not None
        ]
        cells.append(f"{min(losses):.4f}–{max(losses):.4f}" if losses else "—")
    lines.append(
        "| final loss, every contender (same start, batches, steps: must agree) | "
        + " | ".join(cells)
        + " |"
    )
    lines.append("")
    lines.append("Ratio to the hand-written `jax.jit` loop (median / median; < 1 is faster):")
    lines.append("")
    lines.append("| contender | " + " | ".join(models) + " |")
    lines.append("|---|" + "---|" * len(models))
    for key, label in CONTENDERS.items():
        cells = []
        for m in models:
            cs = report["models"][m]["contenders"]
            c, ref = cs.get(key), cs.get("jax_jit")
            if c and ref and c.get("median_s") and ref.get("median_s"):
                cells.append(f"{c['median_s'] / ref['median_s']:.2f}")
            else:
                cells.append("—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    mem_rows = [(m, report["models"][m].get("memory")) for m in models]
    if any(mem for _, mem in mem_rows):
        lines.append("")
        lines.append(
            "Compiled memory analysis of jaxtrain's `train_step` (bytes; peak estimate = "
            "arguments + outputs - aliased + temporaries):"
        )
        lines.append("")
        lines.append("| model | state | donated: alias | donated: peak | not donated: peak |")
        lines.append("|---|---|---|---|---|")
        for m, mem in mem_rows:
            if not mem:
                continue
            d, n = mem.get("donated", {}), mem.get("not_donated", {})
            lines.append(
                f"| {m} | {mem['state_bytes']:,} | {d.get('alias_size_in_bytes', '—'):,} | "
                f"{d.get('peak_estimate_bytes', '—'):,} | {n.get('peak_estimate_bytes', '—'):,} |"
            )
    fs_rows = [(m, report["models"][m].get("first_step")) for m in models]
    if any(fs for _, fs in fs_rows):
        lines.append("")
        lines.append(
            "Time to the first step of jaxtrain's `train_step` in a fresh process "
            "(trace + compile or cache load + run), cold vs warm persistent compilation cache:"
        )
        lines.append("")
        lines.append("| model | cold | warm | cold / warm | process wall cold / warm |")
        lines.append("|---|---|---|---|---|")
        for m, fs in fs_rows:
            if fs:
                lines.append(
                    f"| {m} | {fs['cold_s']:.2f} s | {fs['warm_s']:.2f} s | "
                    f"{fs['speedup']:.1f}x | {fs['cold_process_s']:.1f} s / "
                    f"{fs['warm_process_s']:.1f} s |"
                )
    fit = report.get("fit")
    if fit:
        lines.append("")
        lines.append(
            f"`fit` on {fit['model']}, {fit['steps']} steps (host-fed ArrayDataset): "
            f"logging every 10 steps + JSONL writer + progress bar "
            f"{fmt_time(fit['on']['median_s'])}/step vs none "
            f"{fmt_time(fit['off']['median_s'])}/step "
            f"(ratio {fit['on']['median_s'] / fit['off']['median_s']:.3f}); "
            f"train-step compilations: {fit['train_step_compilations']}."
        )
    lines.append("")
    lines.append("Goals (issue #5):")
    lines.append("")
    lines.append("| goal | model | measured | target | result |")
    lines.append("|---|---|---|---|---|")
    for g in report["goals"]:
        ratio = "—" if g["ratio"] is None else f"{g['ratio']:.2f}"
        detail = f" ({g['detail']})" if g.get("detail") else ""
        lines.append(
            f"| {g['goal']}{detail} | {g['model'] or '—'} | {ratio} | "
            f"{g['op']} {g['target']:g} | **{g['result']}** |"
        )
    return "\n".join(lines)


def header(report: dict[str, Any]) -> str:
    m, v, d = report["machine"], report["versions"], report["device"]
    return "\n".join(
        [
            f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
            f"{m['memory_gib']} GiB, {m['os']}, load average {m['loadavg_1m_start']}",
            f"device: {d['platform']} {d['device_kind']} x{d['count']}; "
            f"PyTorch threads: {d['torch_threads']}",
            "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        ]
    )


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="full",
        help="full: the measured table (~10 min on 2 cores); tiny: a smoke run",
    )
    ap.add_argument(
        "--models",
        default=",".join(MODEL_NAMES),
        help=f"comma-separated subset of {','.join(MODEL_NAMES)}",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per timed section for every model (default: per --size); "
        "a multiple of the 11 batches per epoch and of --k",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed sections per contender")
    ap.add_argument("--warmup", type=int, default=None, help="untimed sections first")
    ap.add_argument(
        "--k",
        type=int,
        default=None,
        help="steps per fused call (default: the 11 batches of one epoch)",
    )
    ap.add_argument(
        "--torch-threads", type=int, default=None, help="default: the cores JAX's CPU backend uses"
    )
    ap.add_argument(
        "--no-first-step",
        action="store_true",
        help="skip the cold/warm compilation-cache subprocesses",
    )
    ap.add_argument("--no-fit", action="store_true", help="skip fit with logging on vs off")
    ap.add_argument(
        "--population",
        choices=("run", "skip", "only"),
        default="run",
        help="the population section (benchmarks/population_bench.py, issue #14: N members "
        "in one step vs N sequential runs) for the models of --models among mlp64, cnn: run "
        "it too, skip it, or run only it",
    )
    ap.add_argument("--out", default="benchmarks/results.json", help="JSON output path")
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    size = SIZES[args.size]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_NAMES]
    if bad or not models:
        raise SystemExit(
            f"--models: unknown {bad or models!r}; choose a comma-separated subset of "
            f"{','.join(MODEL_NAMES)} (e.g. --models mlp64,cnn)."
        )
    repeats = args.repeats if args.repeats is not None else size["repeats"]
    warmup = args.warmup if args.warmup is not None else size["warmup"]
    if repeats < 1 or warmup < 0:
        raise SystemExit(f"--repeats must be >= 1 and --warmup >= 0; got {repeats}, {warmup}.")

    import jax

    import jaxtrain as jt
    from jaxtrain.data import load_digits

    train, _ = load_digits()
    per_epoch = jt.ArrayDataset(train, BATCH_SIZE, drop_remainder=True).steps_per_epoch
    k = args.k if args.k is not None else per_epoch
    unit = math.lcm(per_epoch, k) if k >= 1 else 0
    steps_for = {}
    for m in models:
        s = args.steps if args.steps is not None else size["steps"][m]
        if k < 1 or s < 1 or s % unit:
            raise SystemExit(
                f"--steps {s} with --k {k}: the steps per timed section must be a positive "
                f"multiple of {unit} (the device-resident contender runs whole epochs of "
                f"{per_epoch} batches of {BATCH_SIZE}, the fused ones K={k} steps per call). "
                f"Fix: --steps {max(unit, (s // max(unit, 1)) * unit) if unit else per_epoch}."
            )
        steps_for[m] = s
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch_threads = args.torch_threads or usable

    dev = jax.devices()[0]
    report: dict[str, Any] = {
        "machine": machine_info(),
        "versions": versions_info(),
        "device": {
            "platform": dev.platform,
            "device_kind": dev.device_kind,
            "count": jax.device_count(),
            # XLA's CPU backend runs its intra-op thread pool on every usable core.
            "jax_cpu_threads": usable if dev.platform == "cpu" else None,
            "torch_threads": torch_threads,
        },
        "config": {
            "size": args.size,
            "models": models,
            "steps": steps_for,
            "repeats": repeats,
            "warmup": warmup,
            "k": k,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "steps_per_epoch": per_epoch,
        },
        "models": {},
    }
    print(header(report), flush=True)
    t_start = time.perf_counter()
    for m in models if args.population != "only" else ():
        t0 = time.perf_counter()
        w = make_workload(m, steps_for[m], k, train)
        contenders = jax_contenders(w) + torch_contenders(w, torch_threads)
        measure(contenders, w.steps, repeats, warmup)
        entry: dict[str, Any] = {"description": model_description(m), "steps": w.steps}
        entry["contenders"] = {}
        for c in contenders:
            st = stats(c.times) or {}
            compiled = getattr(c.run, "compiled", None) if c.run else None
            entry["contenders"][c.key] = {
                "label": c.label,
                "status": c.status,
                "per_step_s": c.times,
                "warmup_s": c.warmup_s,
                "final_loss": c.final_loss,
                **st,
                **({"compilations": compiled.trace_count} if compiled is not None else {}),
            }
        entry["memory"] = memory_analysis(w)
        if not args.no_first_step and (args.size == "full" or m == models[0]):
            entry["first_step"] = first_step_cold_warm(m)
        entry["seconds"] = time.perf_counter() - t0
        report["models"][m] = entry
        print(f"[{m}] measured in {entry['seconds']:.0f} s", file=sys.stderr, flush=True)
        del contenders, w
        gc.collect()
    fit = None
    if not args.no_fit and args.population != "only":
        fit_model = "mlp64" if "mlp64" in models else models[0]
        fit = fit_on_off(make_workload(fit_model, steps_for[fit_model], k, train), repeats, warmup)
    report["fit"] = fit
    report["goals"] = goals(report["models"], fit) if report["models"] else []
    report["population"] = None
    pop_models = tuple(m for m in models if m in ("mlp64", "cnn"))
    if args.population != "skip" and pop_models:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import population_bench  # benchmarks/population_bench.py

        report["population"] = population_bench.population_section(
            sys.modules[__name__], args.size, pop_models, repeats=args.repeats
        )
    report["machine"]["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report["seconds"] = time.perf_counter() - t_start
    report["markdown"] = markdown(report) if report["models"] else ""
    if report["population"] is not None:
        report["markdown"] += "\n\n" + report["population"]["markdown"]
    print()
    print(report["markdown"])
    print(
        f"\n{report['seconds']:.0f} s in all; load average at the end "
        f"{report['machine']['loadavg_1m_end']}"
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from jaxtrain.writers import dumps_strict  # strict JSON: no NaN tokens

        with open(args.out, "w") as f:
            f.write(dumps_strict(report, indent=1, default=float))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == FIRST_STEP_FLAG:
        first_step_child(sys.argv[2], sys.argv[3])
    else:
        main()
