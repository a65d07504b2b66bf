"""`fit`: the outer loop around a compiled train step.

Lives here: `fit` (its argument checks, the wiring of its built-in callbacks, and the
loop itself: dispatch a call, advance the `LoopState`, tell the callbacks). Everything
else a run does is a callback in its own module: the train log and throughput
(`jaxtrain.train_log`), evaluation and early stopping (`jaxtrain.evaluation`),
checkpoints, resume and preemption (`jaxtrain.checkpointing`), writers, hooks and the
progress bar (`jaxtrain.callbacks`); feeding batches is `jaxtrain.feed`. Must not live
here: any of those. The loop never imports the CLI, the job or torch.

The loop is host code that only dispatches: it never reads a value back from the device
except at logging and evaluation intervals, so JAX's asynchronous dispatch keeps the
device busy while Python prepares the next batch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtrain.callbacks import (
    Callback,
    CallbackList,
    EventHook,
    Every,
    HookCallback,
    PeriodicHook,
    ProgressBar,
    Writer,
    WriterCallback,
)
from jaxtrain.checkpointing import Checkpointing, Preempted, Preemption
from jaxtrain.data import ArrayDataset, DataPosition
from jaxtrain.ema import check_eval_params, ema_state
from jaxtrain.evaluation import EarlyStop, EarlyStopping, Evaluator, eval_metric_names, evaluate
from jaxtrain.feed import Call, Feed
from jaxtrain.grain_data import GrainData
from jaxtrain.loop_state import History, LoopState
from jaxtrain.parallel import data_mesh, init_sharded, shard_state
from jaxtrain.population_fit import MemberEarlyStop, PopulationReport, check_fit
from jaxtrain.profiler import Profile, profile_callback
from jaxtrain.state import TrainState
from jaxtrain.step import CompiledStep
from jaxtrain.step_options import StepSpec
from jaxtrain.train_log import TrainLog, per_step_metrics

if TYPE_CHECKING:  # annotations only: orbax is imported when a Checkpointer is made
    from jaxtrain.checkpoint import Checkpointer

__all__ = [
    "EarlyStopping",
    "EventHook",
    "History",
    "PeriodicHook",
    "Preempted",
    "Writer",
    "evaluate",
    "fit",
    "per_step_metrics",
]


def _spec_of(train_step: Any) -> StepSpec:
    """What the step declares; a plain callable (a user's own jitted step) is one step."""
    return train_step.spec if isinstance(train_step, CompiledStep) else StepSpec("step")


def _fit_mesh(train_step: Any, eval_step: Any, mesh: Mesh | None) -> Mesh:
    """The mesh fit runs on: the one the steps were built with (passed once, to the
    step builders); ``mesh=`` only for steps built without one (default all devices).

    Raises:
        ValueError: ``mesh=`` (or the eval step's mesh) is not the train step's mesh.
    """
    own = train_step.mesh if isinstance(train_step, CompiledStep) else None
    evm = eval_step.mesh if isinstance(eval_step, CompiledStep) else None
    for name, other, fix in (
        ("fit(mesh=...)", mesh, "drop fit's mesh= (or pass the same mesh to every step builder)"),
        ("the eval step's mesh", evm, "build the eval step with the train step's mesh="),
    ):
        if own is not None and other is not None and other != own:
            raise ValueError(
                f"{name} is {dict(other.shape)} over devices "
                f"{[d.id for d in other.devices.flat]}, but the train step was built for the "
                f"mesh {dict(own.shape)} over devices {[d.id for d in own.devices.flat]}; a "
                f"step carries its mesh and fit takes it from there. Fix: {fix}."
            )
    run = own if own is not None else (data_mesh() if mesh is None else mesh)
    if evm is not None and set(evm.devices.flat) != set(run.devices.flat):
        # A train step without a mesh: the state lives on fit's mesh, which an eval step
        # compiled for other devices cannot read (JAX would say so only at the first eval).
        where = "fit(mesh=...)" if mesh is not None else "all devices, fit's default"
        raise ValueError(
            f"the eval step's mesh is {dict(evm.shape)} over devices "
            f"{[d.id for d in evm.devices.flat]}, but fit trains on {dict(run.shape)} over "
            f"devices {[d.id for d in run.devices.flat]} ({where}), where the state lives. "
            "Fix: build the train and eval steps with the same mesh= (fit takes it from "
            "the train step)."
        )
    return run


def _check_counts(epochs, num_steps, log_every, eval_every, save_every, flops_per_step) -> None:
    if epochs is None and num_steps is None:
        raise ValueError("fit needs epochs=... or num_steps=... (or both); got neither.")
    for name, v in (("epochs", epochs), ("num_steps", num_steps), ("log_every", log_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    for name, v in (("eval_every", eval_every), ("save_every", save_every)):
        if v is not None and not isinstance(v, Every):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"{name} must be a positive integer (steps), an Every(steps=...|epochs=...) "
                    f"or None; got {v!r}."
                )
    if flops_per_step is not None and (
        isinstance(flops_per_step, bool)
        or not isinstance(flops_per_step, (int, float, np.integer, np.floating))
        or not math.isfinite(flops_per_step)
        or flops_per_step <= 0
    ):
        raise ValueError(
            f"flops_per_step must be a positive number of FLOPs or None; got {flops_per_step!r}. "
            "Fix: pass jaxtrain.perf.step_flops(train_step, state, batch), or leave it out when "
            "the backend gives no cost analysis (step_flops returned None)."
        )


def _check_eval(state, eval_step, eval_data, early_stopping) -> None:
    if (eval_step is None) != (eval_data is None):
        raise ValueError("eval_step and eval_data go together: give both or neither.")
    if early_stopping is None:
        return
    if eval_step is None:
        raise ValueError("early_stopping watches an eval metric: give eval_step and eval_data.")
    if not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            f"early_stopping must be a jaxtrain.EarlyStopping; got {type(early_stopping).__name__}."
        )
    names = eval_metric_names(eval_step, state, eval_data)
    if names is not None and early_stopping.metric not in names:
        raise ValueError(
            f"early_stopping.metric={early_stopping.metric!r} is not a metric of the "
            f"evaluation, which reports {sorted(names)}. Fix: "
            f"EarlyStopping({sorted(names)[0]!r}, ...) or another of those names."
        )


def _check_eval_params(state, eval_step, eval_params) -> None:
    check_eval_params(eval_params)
    if eval_params == "ema":
        if eval_step is None:
            raise ValueError("eval_params='ema' chooses what is evaluated: give eval_step too.")
        ema_state(state)  # refuses a state without an EMA, before training starts


def _check_checkpointing(checkpointer, resume, save_every) -> None:
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be True, False or 'auto'; got {resume!r}.")
    if (resume or save_every) and checkpointer is None:
        raise ValueError(
            "resume and save_every need a checkpointer: pass "
            "checkpointer=jaxtrain.checkpoint.Checkpointer(directory)."
        )


def _start_fresh(
    loop: LoopState, mesh: Mesh, start: DataPosition | None, copy: bool = True
) -> None:
    """Not resuming: fit's own copy of the state on ``mesh``, and the start position.

    A private copy: the step donates its input, and the caller's state (and the params
    it was built from) must stay usable after fit returns. Replicated, or split by the
    FSDP rule on a mesh with an ``fsdp`` axis. ``copy=False`` for a state fit created
    itself (already placed, and nobody else's): a copy would double its memory.
    """
    loop.state = shard_state(loop.state, mesh, copy=copy)
    loop.step = int(jax.device_get(loop.state.step))  # one sync at the start, none per step
    loop.seek(DataPosition() if start is None else start)


def _feed(spec: StepSpec, train_data: Any, loop: LoopState, mesh: Mesh) -> Feed:
    """The feed for the step's kind; a device-resident epoch's conditions checked first."""
    if spec.kind == "epoch":
        if spec.dataset is not train_data:
            raise ValueError(
                "a step from make_device_epoch runs the data set it was built with: pass that "
                "same ArrayDataset as train_data."
            )
        per_epoch: int = train_data.steps_per_epoch  # the ArrayDataset of the step
        if loop.index or (loop.num_steps is not None and (loop.num_steps - loop.step) % per_epoch):
            raise ValueError(
                "a device-resident epoch runs whole epochs: start at a batch index of 0 and "
                f"use epochs= (or num_steps in multiples of {per_epoch}); got start="
                f"{DataPosition(loop.epoch, loop.index)}, num_steps={loop.num_steps}."
            )
        return Feed("epoch", per_epoch, train_data, mesh)
    return Feed(spec.kind, spec.steps_per_call, train_data, mesh, spec.member_batches)


def _advance(loop: LoopState, call: Call, metrics: Any) -> None:
    """The loop's own bookkeeping after a call of ``call.steps`` steps (host only)."""
    loop.prev_step, loop.call_steps, loop.call_examples = loop.step, call.steps, call.examples
    loop.metrics = metrics
    loop.pending.append((metrics, call.steps))
    loop.step += call.steps
    loop.index += call.steps
    loop.history.steps += call.steps
    loop.history.examples += call.examples


def _run_epoch(loop: LoopState, feed: Feed, train_step: Callable) -> None:
    """One epoch from ``loop.index`` on, or less if the budget or a callback stops it."""
    events = loop.callbacks
    left = math.inf if loop.num_steps is None else loop.num_steps - loop.step
    ran = 0
    for call in feed.calls(loop.epoch, loop.index, left):
        events.on_call_begin(loop)
        loop.call_started = loop.clock()
        loop.state, metrics = train_step(loop.state, *call.args)
        _advance(loop, call, metrics)
        ran += call.steps
        events.on_call_end(loop)
        if loop.stop or (loop.num_steps is not None and loop.step >= loop.num_steps):
            loop.stop = True
            return
    if ran == 0 and loop.index == 0:
        raise ValueError(f"train_data yielded no batches in epoch {loop.epoch}.")
    loop.at_epoch_end = True
    events.on_epoch_end(loop)
    loop.at_epoch_end = False
    loop.epoch, loop.index = loop.epoch + 1, 0


def _builtin_callbacks(train_step, train_data, mesh, a: Mapping[str, Any], start_fresh):
    """fit's keyword arguments as callbacks, in the order they act at each event.

    At a step: the train log's record, the evaluation (and early stopping), the
    checkpoint, writers, ``hooks=``; then the user's callbacks; then the preemption check
    (so a SIGTERM saves after all of a step's work); the progress bar last.
    """

    def nonfinite():
        spec = _spec_of(train_step)
        return spec.nonfinite, spec.nonfinite_names

    def compile_seconds():
        return train_step.compile_seconds if isinstance(train_step, CompiledStep) else 0.0

    members = _spec_of(train_step).population  # a population: [N] metrics, per member
    log = TrainLog(a["log_every"], a["flops_per_step"], mesh, nonfinite, compile_seconds, members)
    stop_rule = MemberEarlyStop if members else EarlyStop
    early = None if a["early_stopping"] is None else stop_rule(a["early_stopping"])
    # The profiler first: its trace starts before, and stops before, anything else's work.
    out: list[Callback] = [] if a["profile"] is None else [a["profile"]]
    out.append(log)
    if a["eval_step"] is not None:
        every, params = a["eval_every"], a["eval_params"]
        out.append(Evaluator(a["eval_step"], a["eval_data"], every, mesh, log, params))
    ckpt = None
    if a["checkpointer"] is not None:
        ckpt = Checkpointing(
            a["checkpointer"], every=a["save_every"], at_epoch_end=a["save_at_epoch_end"],
            resume=a["resume"], train_data=train_data, mesh=mesh, log=log, early_stop=early,
            config=a["config"], start_fresh=start_fresh,
        )  # fmt: skip
        out.append(ckpt)
    primary = jax.process_index() == 0  # only process 0 shows progress and writes logs
    out.append(WriterCallback(a["writers"], primary))
    out += [HookCallback(h) for h in a["hooks"]]
    out += [] if early is None else [early]
    out += [PopulationReport(early)] if members else []  # type: ignore[arg-type]
    out += list(a["callbacks"])
    out += [] if ckpt is None else [Preemption(ckpt)]
    out.append(ProgressBar(a["progress"] and primary))
    return out


def fit(
    state: TrainState,
    train_step: CompiledStep | Callable,
    train_data: ArrayDataset | GrainData | Iterable | Callable,
    *,
    epochs: int | None = None,
    num_steps: int | None = None,
    eval_step: CompiledStep | Callable | None = None,
    eval_data: ArrayDataset | Iterable | None = None,
    eval_every: int | Every | None = None,
    log_every: int = 50,
    mesh: Mesh | None = None,
    hooks: Sequence[PeriodicHook | EventHook] = (),
    early_stopping: EarlyStopping | None = None,
    writers: Sequence[Writer] = (),
    progress: bool = True,
    start: DataPosition | None = None,
    checkpointer: Checkpointer | None = None,
    save_every: int | Every | None = None,
    save_at_epoch_end: bool = True,
    resume: bool | str = False,
    config: Mapping[str, Any] | None = None,
    flops_per_step: float | None = None,
    callbacks: Sequence[Callback] = (),
    eval_params: str = "params",
    profile: tuple[int, int, str] | Profile | None = None,
) -> tuple[TrainState, History]:
    """Runs the training loop: epochs or a step budget, evaluation, logging, checkpoints.

    ``epochs`` and ``num_steps`` are totals for the run, as in Keras and Lightning:
    training stops after epoch ``epochs - 1`` or once ``state.step`` reaches
    ``num_steps``, so a resumed run stops exactly where the uninterrupted one would.

    Args:
        state: the initial `TrainState`. fit copies it onto ``mesh`` once, so the
            caller's arrays stay valid although every step donates its input. Or a
            `jaxtrain.population.PopulationState` trained by a population step
            (`jaxtrain.population_step`): records then hold N values per metric,
            early stopping acts per member and ``history.population`` reports the best. Or a
            function of no arguments that creates it: fit then creates it directly in
            its shardings on the mesh (`jaxtrain.parallel.init_sharded`), so no device
            or host ever holds the whole state.
        train_step: from `make_train_step` (or `make_train_steps`, `make_device_epoch`:
            fit feeds each the way its ``spec`` declares), or any function
            ``(state, batch) -> (state, metrics)``.
        train_data: an `ArrayDataset`, a `jaxtrain.GrainData` (a grain pipeline; its
            iterator state is saved with checkpoints), a callable ``epoch -> iterable of
            batches``, or an iterable of dict batches (re-iterated each epoch if it can be).
        epochs: train until this many epochs are complete (counted from epoch 0).
        num_steps: train until ``state.step == num_steps``; with ``epochs`` too,
            whichever comes first.
        eval_step: from `make_eval_step`; needs ``eval_data``.
        eval_data: evaluated at the end of each epoch (or every ``eval_every`` steps
            if given) and at the end.
        eval_every: evaluate every this many global steps, or at an
            ``jaxtrain.callbacks.Every(steps=...)`` / ``Every(epochs=n)`` cadence (default:
            at every epoch end).
        log_every: read training metrics back every this many global steps (the only
            periodic host sync); also at epoch ends and before each checkpoint.
        mesh: the mesh, for a train step built without one; a step built with
            ``mesh=`` carries it and fit takes it from the step (passing another one
            here is an error). Default all devices (`jaxtrain.data_mesh`). A mesh from
            `jaxtrain.make_mesh` with an ``fsdp`` axis also shards the state
            (`jaxtrain.shard_state`). With several processes (`jaxtrain.distributed`)
            it spans all of them; an `ArrayDataset` or `GrainData` then serves each
            process its own rows of every global batch; other data must yield this
            process's rows.
        hooks: `PeriodicHook` and `EventHook` callbacks. Those due at a step run once
            each, in this order, after fit's own work for that step (log record,
            evaluation, checkpoint): a hook at an epoch end sees its evaluation.
        early_stopping: stop on an eval metric; needs ``eval_step``.
        writers: log sinks, each gets every train and eval record (on process 0
            only, with several processes).
        progress: show a tqdm bar with loss and examples/s, and TFLOP/s and MFU with
            ``flops_per_step`` (process 0 only).
        start: data position to start from; default the beginning (or, when
            resuming, the checkpoint's position).
        checkpointer: a `jaxtrain.checkpoint.Checkpointer`; saves every
            ``save_every`` steps, at epoch ends (``save_at_epoch_end``) and at the end.
            fit waits for pending asynchronous saves before returning, also when an
            exception or Ctrl-C ends it. With a checkpointer, SIGTERM (preemption)
            finishes the current step, saves and commits a checkpoint, and raises
            `Preempted` (single-process runs, main thread; the previous handler is
            restored on return).
        save_every: save every this many global steps, or at an ``Every`` cadence
            (``Every(epochs=n)`` with ``save_at_epoch_end=False``: every n epochs); None:
            only epoch ends and the end.
        save_at_epoch_end: save after each epoch's evaluation.
        resume: True continues from the newest committed checkpoint (restoring state,
            data position, metrics history and early-stopping counters; error if
            there is none); ``"auto"`` does so when one exists and starts afresh
            otherwise.
        config: JSON-ready run configuration stored in every checkpoint.
        flops_per_step: FLOPs of one training step on all devices (e.g. from
            `jaxtrain.perf.step_flops`). Then each train record also has
            ``model_flops_per_second`` and ``mfu`` (against `jaxtrain.perf.peak_flops` of the
            mesh's devices; None where the peak is unknown, as on CPU), and the progress
            bar shows TFLOP/s and MFU ("unknown" there). From the interval's
            device-synchronised time, as ``examples_per_second`` (see `History`): no
            extra host sync.
        callbacks: your own `jaxtrain.Callback` objects; each event reaches them after
            fit's own callbacks for it (log record, evaluation, checkpoint, hooks).
        eval_params: ``"params"`` (default) evaluates the trained parameters; ``"ema"``
            their moving average (a state from ``TrainState.create(..., ema=True)``, a
            step built with ``ema_decay=``; `jaxtrain.ema`).
        profile: ``(start, stop, log_dir)`` or a `jaxtrain.profiler.Profile`: a
            ``jax.profiler`` trace of steps ``[start, stop)`` written to ``log_dir``
            (TensorBoard's profile plugin, Perfetto); the range is checked against the
            run's length before training.

    Returns:
        ``(final_state, history)``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> model = jt.from_function(lambda p, x: x @ p["w"])  # logits [B, 2]
        >>> opt = optax.sgd(0.5)
        >>> state = jt.TrainState.create({"w": jnp.zeros((3, 2))}, opt, jax.random.key(0))
        >>> from jaxtrain.apps.tasks import classification_loss
        >>> train_step = jt.make_train_step(classification_loss(model), opt)
        >>> data = {"x": np.eye(3, dtype=np.float32)[[0, 1, 0, 1]], "y": np.array([0, 1, 0, 1])}
        >>> state, history = fit(state, train_step, jt.ArrayDataset(data, 2), epochs=3,
        ...                      progress=False)
        >>> int(state.step), history.steps, train_step.trace_count  # 2 batches x 3 epochs
        (6, 6, 1)
        >>> history.train[-1]["loss"] < history.train[0]["loss"]
        True
    """
    _check_counts(epochs, num_steps, log_every, eval_every, save_every, flops_per_step)
    mesh = _fit_mesh(train_step, eval_step, mesh)
    created = callable(state) and not isinstance(state, TrainState)
    if created:  # created in its shardings; fit's own, so never copied again
        state = init_sharded(cast(Callable[[], Any], state), mesh)
    _check_eval(state, eval_step, eval_data, early_stopping)
    _check_checkpointing(checkpointer, resume, save_every)
    check_fit(state, train_step, eval_step)  # a population's state and steps agree
    _check_eval_params(state, eval_step, eval_params)
    profiler = profile_callback(profile, _spec_of(train_step).steps_per_call)  # K: whole calls
    per_epoch = (
        train_data.steps_per_epoch if isinstance(train_data, (ArrayDataset, GrainData)) else None
    )
    loop = LoopState(state, History(), epochs=epochs, num_steps=num_steps)
    del state  # loop.state is the one reference: a created state is not kept alive twice
    loop.steps_per_epoch, loop.clock = per_epoch, time.perf_counter
    start_fresh = functools.partial(_start_fresh, mesh=mesh, start=start, copy=not created)
    options = dict(
        log_every=log_every, flops_per_step=flops_per_step, early_stopping=early_stopping,
        eval_step=eval_step, eval_data=eval_data, eval_every=eval_every,
        checkpointer=checkpointer, save_every=save_every, save_at_epoch_end=save_at_epoch_end,
        resume=resume, config=config, writers=writers, hooks=hooks, callbacks=callbacks,
        progress=progress, eval_params=eval_params, profile=profiler,
    )  # fmt: skip
    built = _builtin_callbacks(train_step, train_data, mesh, options, start_fresh)
    loop.callbacks = events = CallbackList(built)
    if not resume:  # else the checkpointing callback restores the run (or starts fresh)
        start_fresh(loop)
    try:
        events.on_train_begin(loop)
        feed = _feed(_spec_of(train_step), train_data, loop, mesh)
        while not loop.stop and loop.epoch < loop.last_epoch:
            if loop.num_steps is not None and loop.step >= loop.num_steps:
                break
            _run_epoch(loop, feed, train_step)
        events.on_loop_end(loop)
        events.on_train_end(loop)
        jax.block_until_ready(loop.state)
    finally:
        events.on_exit(loop)
    loop.history.position = loop.position()
    return loop.state, loop.history
