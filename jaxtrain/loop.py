"""`fit`: the outer loop around a compiled train step — and `evaluate`.

The loop is host code that only dispatches: it never reads a value back from the device
except at logging and evaluation intervals, so JAX's asynchronous dispatch keeps the
device busy while Python prepares the next batch.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxtrain import metrics as metrics_lib
from jaxtrain import perf as perf_lib
from jaxtrain.data import MASK_KEY, ArrayDataset, DataPosition, check_batch
from jaxtrain.grain_data import GrainData
from jaxtrain.losses import INVALID_COUNT_KEYS, INVALID_LABELS
from jaxtrain.parallel import _put_batch, data_mesh, process_rows, shard_batch, shard_state
from jaxtrain.state import TrainState
from jaxtrain.step import CompiledStep


class Writer(Protocol):
    """Anything that takes log records (e.g. `jaxtrain.logging.JsonlWriter`)."""

    def write(self, record: Mapping[str, Any]) -> None: ...


class Preempted(Exception):
    """`fit` stopped on SIGTERM after saving and committing a checkpoint at ``step``.

    With a checkpointer, `fit` turns SIGTERM (preemption on TPU VMs, SLURM, Colab) into:
    finish the current step, save a checkpoint, wait for it, raise this. Resuming from
    that checkpoint (``resume=True``) ends bitwise where an uninterrupted run ends.
    ``jaxtrain train`` turns it into exit status 143 (128 + SIGTERM).

    Attributes:
        step: the step of the checkpoint written before stopping.
        directory: the checkpointer's directory.

    Example:
        >>> e = Preempted(40, "runs/digits/checkpoints")
        >>> e.step, str(e)
        (40, 'stopped by SIGTERM after saving checkpoint step 40 in runs/digits/checkpoints')
    """

    def __init__(self, step: int, directory: str):
        super().__init__(f"stopped by SIGTERM after saving checkpoint step {step} in {directory}")
        self.step = step
        self.directory = directory


class _Sigterm:
    """Turns SIGTERM into a request that `fit` honours after the current step.

    Installed only where it can work: in the main thread (Python delivers signals
    there) and in a single-process run (processes of a multi-process run could see the
    signal at different steps and then save different steps: a hang). A second SIGTERM
    gets the previous handler (by default: end at once).
    """

    def __init__(self, enabled: bool):
        self.requested = False
        self.previous: Any = None
        self.installed = False
        if enabled and threading.current_thread() is threading.main_thread():
            if jax.process_count() == 1:
                self.previous = signal.signal(signal.SIGTERM, self._handle)
                self.installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, self._previous())

    def _previous(self) -> Any:
        return signal.SIG_DFL if self.previous is None else self.previous

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous())
            self.installed = False


_sigterm: _Sigterm | None = None  # the active fit's, for _debug_pause


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when an eval metric has not improved for ``patience`` evaluations.

    Attributes:
        metric: name of an eval metric (e.g. ``"accuracy"`` or ``"loss"``).
        mode: ``"max"`` or ``"min"``.
        patience: evaluations without improvement before stopping (>= 1).
        min_delta: smallest change that counts as an improvement.

    Example:
        >>> stop = EarlyStopping("accuracy", "max", patience=2, min_delta=0.01)
        >>> stop.improved(0.95, best=0.90), stop.improved(0.905, best=0.90)
        (True, False)
        >>> # jaxtrain.fit(..., eval_step=..., eval_data=..., early_stopping=stop)
    """

    metric: str = "loss"
    mode: str = "min"
    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self):
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(
                f"EarlyStopping metric must be the name of an eval metric (e.g. 'loss'); "
                f"got {self.metric!r}."
            )
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max'; got {self.mode!r}.")
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, (int, np.integer))
            or self.patience < 1
        ):
            raise ValueError(
                f"EarlyStopping patience must be >= 1; got {self.patience!r}. It is a whole "
                "number of evaluations without improvement. Fix: e.g. patience=5."
            )
        if (
            isinstance(self.min_delta, bool)
            or not isinstance(self.min_delta, (int, float, np.integer, np.floating))
            or not math.isfinite(self.min_delta)
            or self.min_delta < 0
        ):
            raise ValueError(
                f"EarlyStopping min_delta must be a finite number >= 0; got {self.min_delta!r}. "
                "It is the smallest improvement that counts, in the direction of mode (a "
                "negative one would count getting worse). Fix: min_delta=0.0 or a small "
                "positive number."
            )

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta


@dataclasses.dataclass(frozen=True)
class PeriodicHook:
    """Calls ``fn(state, history)`` every ``every_steps`` training steps.

    The hook runs on the host between dispatches; reading arrays from ``state`` inside
    it is a host sync, so keep ``every_steps`` large for hooks that do.

    Attributes:
        every_steps: call ``fn`` whenever the global step crosses a multiple of this.
        fn: ``fn(state, history)``, given the current `TrainState` and `History`.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> opt = optax.sgd(0.1)
        >>> step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> seen = []
        >>> hook = PeriodicHook(2, lambda state, history: seen.append(int(state.step)))
        >>> data = jt.ArrayDataset({"x": np.ones((12, 2), np.float32)}, 2)
        >>> _ = jt.fit(state, step, data, epochs=1, hooks=[hook], progress=False)
        >>> seen
        [2, 4, 6]
    """

    every_steps: int
    fn: Callable[[TrainState, History], None]

    def __post_init__(self):
        if (
            isinstance(self.every_steps, bool)
            or not isinstance(self.every_steps, (int, np.integer))
            or self.every_steps < 1
        ):
            raise ValueError(
                f"PeriodicHook every_steps must be an integer >= 1 (training steps); got "
                f"{self.every_steps!r}. Fix: PeriodicHook(100, fn) calls fn every 100 steps."
            )
        if not callable(self.fn):
            raise TypeError(
                f"PeriodicHook fn must be callable as fn(state, history); got "
                f"{type(self.fn).__name__}."
            )


HOOK_EVENTS = ("epoch_end", "eval_end")


@dataclasses.dataclass(frozen=True)
class EventHook:
    """Calls ``fn(state, history)`` after an event of the loop.

    Events: ``"epoch_end"`` (after an epoch's last step, its evaluation and its
    checkpoint) and ``"eval_end"`` (after each evaluation, its record already in
    ``history.eval``).

    Order at a step: every hook due at a step (a `PeriodicHook` whose period the step
    crosses, an ``eval_end`` or ``epoch_end`` event there) runs once, in the order of
    ``fit(hooks=...)``, after all of `fit`'s own work for that step: its log record, its
    evaluation, its checkpoint. So a hook at an epoch end sees that epoch's evaluation:
    ``history.eval[-1]["step"] == state.step``.

    Attributes:
        on: ``"epoch_end"`` or ``"eval_end"``.
        fn: ``fn(state, history)``, given the current `TrainState` and `History`.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> opt = optax.sgd(0.1)
        >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
        >>> eval_fn = lambda p, b: {"err": jnp.abs(b["x"] @ p["w"])}
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> seen = []
        >>> hook = EventHook("epoch_end", lambda s, h: seen.append((int(s.step), h.eval[-1]["step"])))
        >>> data = jt.ArrayDataset({"x": np.ones((8, 2), np.float32)}, 4)
        >>> _ = jt.fit(state, jt.make_train_step(loss_fn, opt), data, epochs=2,
        ...            eval_step=jt.make_eval_step(eval_fn), eval_data=data, hooks=[hook],
        ...            progress=False)
        >>> seen  # (step, step of the newest evaluation) at each epoch end
        [(2, 2), (4, 4)]
    """

    on: str
    fn: Callable[[TrainState, History], None]

    def __post_init__(self):
        if self.on not in HOOK_EVENTS:
            raise ValueError(
                f"EventHook on must be one of {list(HOOK_EVENTS)}; got {self.on!r}. Fix: "
                "EventHook('epoch_end', fn), or PeriodicHook(every_steps, fn) for a period."
            )
        if not callable(self.fn):
            raise TypeError(
                f"EventHook fn must be callable as fn(state, history); got "
                f"{type(self.fn).__name__}."
            )


@dataclasses.dataclass
class History:
    """What `fit` observed: log records and a few run totals (plain Python data).

    Attributes:
        train: one dict per logging interval: ``step``, ``epoch``, ``split="train"``, the
            mean of each metric over the interval (``learning_rate``: its last value) and
            ``examples_per_second`` over the interval's device-synchronised time (see
            ``steady_seconds``; the first call, which compiles, is left out: None for an
            interval holding only that call).
        eval: one dict per evaluation: ``step``, ``epoch``, ``split="eval"``, metrics.
        steps: training steps run by this call.
        examples: real (unpadded) training examples seen by this call.
        wall_seconds: wall time of the loop.
        first_step_seconds: wall time of the first step (tracing and compilation).
        stopped_early: whether `EarlyStopping` ended the run.
        best_eval: the eval record with the best early-stopping metric (or None).
        position: where the data iteration stands (resume from here).
        steady_examples: examples seen after the first call (for throughput).
        steady_steps: steps run after the first call.
        steady_seconds: device-synchronised seconds of those steps: each logging
            interval runs from when its first step could start (the previous interval
            finished on the device, or its first step was dispatched, whichever is
            later) to when its last step finished on the device, so evaluation between
            intervals is not counted; checkpoints and hooks inside an interval are.
        compile_seconds: seconds this call spent tracing and compiling the train step
            (or loading it from the persistent cache), from JAX's compile events; 0.0
            when the step was compiled before (e.g. by `jaxtrain.step_flops`; see
            ``CompiledStep.compile_seconds``) or is not a `CompiledStep`.

    Example:
        >>> h = History(steps=3, wall_seconds=3.0, first_step_seconds=1.0, steady_examples=64)
        >>> h.examples_per_second  # 64 examples after the compiling step, in 2 s
        32.0
        >>> h.to_dict()["position"]
        {'epoch': 0, 'index': 0}
    """

    train: list[dict] = dataclasses.field(default_factory=list)
    eval: list[dict] = dataclasses.field(default_factory=list)
    steps: int = 0
    examples: int = 0
    wall_seconds: float = 0.0
    first_step_seconds: float = 0.0
    stopped_early: bool = False
    best_eval: dict | None = None
    position: DataPosition = dataclasses.field(default_factory=DataPosition)

    steady_examples: int = 0
    steady_steps: int = 0
    steady_seconds: float = 0.0
    compile_seconds: float = 0.0

    @property
    def examples_per_second(self) -> float:
        """Throughput after the first (compiling) call; 0.0 if only one call ran.

        ``steady_examples / steady_seconds``: device-synchronised, the same time base as
        the train records' ``examples_per_second``. A `History` built by hand without
        ``steady_seconds`` falls back to the wall time after the first step.
        """
        t = self.steady_seconds or self.wall_seconds - self.first_step_seconds
        return self.steady_examples / t if t > 0 and self.steady_examples else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields plus ``examples_per_second``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["position"] = self.position.to_dict()
        d["examples_per_second"] = self.examples_per_second
        return d


class _LocalBatch(dict):
    """One process's rows of a global batch, carrying the global count of real examples."""

    num_real: int = 0


def _local_batches(data: ArrayDataset, epoch: int, start: int, mesh: Mesh | None):
    """The batches as fed to `shard_batch`: whole in one process, this process's rows in many.

    Every process draws the same permutation (same seed) and gathers only its own
    contiguous block of each global batch; the global count of real examples rides
    along so that `History.examples` counts the global batch.
    """
    if mesh is None or jax.process_count() == 1:
        yield from data.batches(epoch, start)
        return
    rows = process_rows(mesh, data.batch_size)
    for i, batch in enumerate(data.batches(epoch, start, rows=rows), start=start):
        local = _LocalBatch(batch)
        local.num_real = min(data.batch_size, data.num_examples - i * data.batch_size)
        yield local


def _local_grain_batches(data: GrainData, epoch: int, start: int, mesh: Mesh | None):
    """`GrainData` batches, cut to this process's rows when there are several processes.

    Every process runs the same deterministic pipeline (same seed, same order) and keeps
    its own block of rows of each global batch, as with `ArrayDataset`: the global batch
    is the one a single process would see, so multi-process runs equal one-process runs.
    (Each process reads every record; grain's own per-process sharding would change the
    global batches.)
    """
    if mesh is None or jax.process_count() == 1:
        yield from data.batches(epoch, start)
        return
    rows = process_rows(mesh, data.batch_size)
    for batch in data.batches(epoch, start):
        local = _LocalBatch({k: v[rows] for k, v in batch.items()})
        local.num_real = int(np.sum(batch[MASK_KEY]))
        yield local


def _epoch_batches(
    data: Any, epoch: int, start: int, mesh: Mesh | None = None
) -> Iterator[Mapping[str, Any]]:
    if isinstance(data, ArrayDataset):
        return _local_batches(data, epoch, start, mesh)
    if isinstance(data, GrainData):
        return _local_grain_batches(data, epoch, start, mesh)
    if callable(data):  # epoch -> iterable of batches
        it = iter(data(epoch))
    elif isinstance(data, Iterable):
        it = iter(data)
    else:
        raise TypeError(
            "train_data must be an ArrayDataset, an iterable of dict batches, or a callable "
            f"epoch -> iterable; got {type(data).__name__}."
        )
    for _ in range(start):
        next(it, None)
    return _host_checked(it, f"train_data epoch {epoch}", start)


def _host_checked(batches: Iterable[Any], what: str, start: int = 0) -> Iterator[Any]:
    """Batches of a plain iterable, each checked on the host before it is placed.

    `jaxtrain.data.check_batch`: NaN/Inf inputs, negative labels in ``y`` (the upper
    bound needs ``num_classes``: the built-in losses count those on the device), and
    masks outside ``[0, 1]`` are errors naming the batch, entry, index and value. Entries
    that are already ``jax.Array`` s are not read back (that would be a host sync per
    step); the built-in losses' counts and ``nonfinite=`` guard cover them on the device.
    `ArrayDataset` (checked once when built) and `GrainData` (checked as it serves) do
    not come through here.
    """
    for i, b in enumerate(batches, start=start):
        if isinstance(b, Mapping):
            check_batch(b, f"{what}, batch {i}")
        yield b


def _num_real(batch: Mapping[str, Any]) -> int:
    if isinstance(batch, _LocalBatch):
        return batch.num_real
    mask = batch.get(MASK_KEY)
    if mask is not None and isinstance(mask, np.ndarray):
        return int(mask.sum())
    first = next(iter(batch.values()))
    return int(np.shape(first)[0])


class _SameShapes:
    """Host-side check that every batch has the first batch's entries, shapes and dtypes.

    A batch of another shape would silently recompile the step (the classic JAX loop
    bug); here it is an error that says which entry differs.
    """

    def __init__(self):
        self.spec: dict[str, tuple] | None = None

    def __call__(self, batch: Mapping[str, Any]) -> None:
        spec = {
            k: (tuple(np.shape(v)), str(getattr(v, "dtype", type(v).__name__)))
            for k, v in batch.items()
        }
        if self.spec is None:
            self.spec = spec
        elif spec != self.spec:
            diff = {
                k: (self.spec.get(k), spec.get(k))
                for k in set(spec) | set(self.spec)
                if self.spec.get(k) != spec.get(k)
            }
            raise ValueError(
                "every batch must have the same entries, shapes and dtypes (a new shape "
                f"recompiles the step); (first batch, this batch) differ for {diff}. Fix: "
                "pad the last batch and mask it (ArrayDataset does this)."
            )


def _prefetch(batches: Iterable[Mapping[str, Any]], mesh: Mesh, depth: int = 2, check: Any = None):
    """Puts batches on the devices ``depth - 1`` ahead so transfer overlaps compute."""
    queue: collections.deque = collections.deque()
    for b in batches:
        if not isinstance(b, Mapping):
            raise TypeError(f"each batch must be a dict of arrays; got {type(b).__name__}.")
        if check is not None:
            check(b)
        queue.append((_num_real(b), shard_batch(b, mesh)))
        if len(queue) >= depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _stack(group: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(b[k]) for b in group]) for k in group[0]}


def _prefetch_calls(
    batches: Iterable[Mapping[str, Any]],
    mesh: Mesh,
    steps_per_call: int | None,
    max_steps: float,
    check: Any,
    step: Any = None,
) -> Iterator[tuple[int, int, Any]]:
    """Yields ``(k, real examples, device batch)`` per call, one call ahead.

    ``steps_per_call=None``: one batch per call. Otherwise up to K batches stacked
    ``[k, B, ...]`` and sharded ``P(None, batch axes)``; a group never crosses the end of
    the epoch or of the step budget (``max_steps``), so a shorter last group may come.
    While the caller runs ``step`` on such a group, ``step._group_size`` is k: the fused
    step's check of the leading ``[K]`` axis accepts it then, and only then.
    """

    def announce(item):
        short = step is not None and hasattr(step, "_group_size") and item[0] != steps_per_call
        if short:
            step._group_size = item[0]
        try:
            yield item
        finally:
            if short:
                step._group_size = None

    if steps_per_call is None:
        left = max_steps
        for n_real, batch in _prefetch(batches, mesh, check=check):
            if left <= 0:
                return
            left -= 1
            yield 1, n_real, batch
        return

    def groups():
        left, group = max_steps, []
        for b in batches:
            if left <= 0:
                break
            if not isinstance(b, Mapping):
                raise TypeError(f"each batch must be a dict of arrays; got {type(b).__name__}.")
            check(b)
            group.append(b)
            left -= 1
            if len(group) == steps_per_call:
                yield group
                group = []
        if group:
            yield group

    queue: collections.deque = collections.deque()
    for group in groups():
        stacked = _put_batch(_stack(group), mesh, stacked=True)
        queue.append((len(group), sum(_num_real(b) for b in group), stacked))
        if len(queue) >= 2:
            yield from announce(queue.popleft())
    while queue:
        yield from announce(queue.popleft())


def evaluate(
    eval_step: CompiledStep | Callable,
    state: TrainState,
    data: ArrayDataset | Iterable[Mapping[str, Any]],
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Exact, mask-weighted metrics over a whole data set.

    Sums are merged on the device and read back once at the end.

    Args:
        eval_step: from `make_eval_step`.
        state: the state to evaluate.
        data: an `ArrayDataset` (served in order, last batch padded; with several
            processes each reads its own rows) or an iterable of dict batches (with
            several processes: this process's rows of each batch).
        mesh: the data mesh (default: all devices).

    Returns:
        ``{name: mean over all real examples}``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> model = jt.from_function(lambda p, x: x @ p["w"])  # logits [B, 2]
        >>> params = {"w": jnp.zeros((3, 2))}
        >>> state = jt.TrainState.create(params, optax.sgd(0.1), jax.random.key(0))
        >>> eval_step = jt.make_eval_step(jt.classification_eval(model))
        >>> data = {"x": np.ones((5, 3), np.float32), "y": np.array([0, 0, 0, 1, 1], np.int32)}
        >>> result = evaluate(eval_step, state, jt.ArrayDataset(data, 2, shuffle=False))
        >>> {k: round(v, 4) for k, v in sorted(result.items())}  # 5 examples, 3 batches
        {'accuracy': 0.6, 'loss': 0.6931}
    """
    mesh = data_mesh() if mesh is None else mesh
    if isinstance(data, ArrayDataset):
        batches = _epoch_batches(data, 0, 0, mesh)
    elif isinstance(data, GrainData):  # checked as it serves
        batches = data
    else:
        batches = _host_checked(data, "eval_data")
    total = None
    for _, batch in _prefetch(batches, mesh):
        sums = eval_step(state, batch)
        total = sums if total is None else _merge(total, sums)
    if total is None:
        raise ValueError("evaluate got no batches: the eval data set is empty.")
    return metrics_lib.compute(total)


_merge = jax.jit(metrics_lib.merge)


_LAST_VALUE_METRICS = ("learning_rate", "skipped_steps", "loss_scale", "loss_scale_overflows")


def per_step_metrics(pending: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Reads metrics back (one transfer) as one dict per step.

    Fused calls (`make_train_steps`) return metrics stacked ``[k]``; single steps
    return scalars. Either way the result has one entry per training step.
    """
    out = []
    for m in jax.device_get(list(pending)):
        arrays = {k: np.asarray(v) for k, v in m.items()}
        n = max((a.shape[0] for a in arrays.values() if a.ndim), default=0)
        if n:
            out.extend({k: a[i] if a.ndim else a for k, a in arrays.items()} for i in range(n))
        else:
            out.append(arrays)
    return out


def _eval_metric_names(eval_step: Any, state: Any, eval_data: Any) -> set[str] | None:
    """The metric names `evaluate` will report, known before training starts.

    An abstract evaluation (``jax.eval_shape``: no compilation, no device work) of the
    eval step on the first eval batch. It does not count as a trace of ``eval_step``.
    None when the names cannot be known without consuming the data (a one-shot
    iterator, a grain pipeline) or the step cannot be evaluated abstractly: the check
    then happens at the first evaluation.
    """
    if isinstance(eval_data, ArrayDataset):
        batch = next(eval_data.batches(0))
    elif (
        isinstance(eval_data, Sequence) and len(eval_data) > 0 and isinstance(eval_data[0], Mapping)
    ):
        batch = eval_data[0]
    else:
        return None
    fn = getattr(eval_step, "fn", None) or eval_step
    traces = getattr(eval_step, "_traces", None)
    try:
        out = jax.eval_shape(fn, state, dict(batch))
    except Exception:  # the first evaluation reports it (or the same error) instead
        return None
    finally:
        if traces is not None:
            eval_step._traces = traces  # an abstract evaluation is not a compilation
    if not isinstance(out, Mapping):
        return None
    return {k for k in out if k not in INVALID_COUNT_KEYS}


def _mean_records(
    pending: Sequence[Mapping[str, Any]], first_step: int, train_step: Any
) -> dict[str, float]:
    """Means over a logging interval (one host transfer); checks the non-finite guard."""
    host = per_step_metrics(pending)  # the one host sync of a logging interval
    # Invalid labels / mask values counted on the device by the built-in losses: checked
    # before the non-finite guard, whose NaN loss they cause and explain.
    for i, m in enumerate(host):
        for key in INVALID_COUNT_KEYS:
            n = float(np.asarray(m.get(key, 0)))
            if n > 0:
                what = (
                    "label(s) outside [0, num_classes) where the mask is > 0"
                    if key == INVALID_LABELS
                    else "mask value(s) outside [0, 1]"
                )
                raise ValueError(
                    f"invalid batch at training step {first_step + i + 1}: the loss counted "
                    f"{int(n)} {what} ({key!r}); its loss and gradients are meaningless "
                    "(the loss is NaN). Fix: remap the labels to [0, num_classes), set "
                    "mask=0 at positions to ignore (e.g. ignore_index -100), keep mask "
                    "values in [0, 1]; ArrayDataset(..., num_classes=C) checks labels "
                    "before training."
                )
    if getattr(train_step, "nonfinite_policy", None) == "raise":
        for i, m in enumerate(host):
            idx = int(m.get("nonfinite", -1))
            if idx >= 0:
                names = getattr(train_step, "nonfinite_names", [])
                where = names[idx] if idx < len(names) else f"value #{idx}"
                if where.startswith(("updates", "new params")):
                    where += (
                        " (the loss and gradients were finite: check the learning rate, its "
                        "schedule and the optimizer's hyperparameters for NaN/Inf)"
                    )
                raise FloatingPointError(
                    f"non-finite value at training step {first_step + i + 1} (update skipped): "
                    f"first non-finite leaf is {where}. Fix: lower the learning rate, clip "
                    "gradients, or check the batch for NaN/Inf inputs; nonfinite='skip' skips "
                    "such steps instead of stopping."
                )
    out = {}
    for k in host[0]:
        if k == "nonfinite" or k in INVALID_COUNT_KEYS:  # all 0 here: nothing to log
            continue
        vals = [float(np.asarray(m[k])) for m in host]
        out[k] = vals[-1] if k in _LAST_VALUE_METRICS else float(np.mean(vals))
    return out


_DEBUG_PAUSE = os.environ.get("JAXTRAIN_DEBUG_PAUSE_AT")  # e.g. "save:2"; fault-injection tests
_debug_counts: collections.Counter = collections.Counter()


def _debug_pause(event: str) -> None:
    """For kill tests only: at the n-th ``event``, say so and wait to be killed."""
    if not _DEBUG_PAUSE:
        return
    _debug_counts[event] += 1
    name, _, n = _DEBUG_PAUSE.partition(":")
    if name == event and _debug_counts[event] == int(n or 1):
        print(f"JAXTRAIN_PAUSED {event} {_debug_counts[event]}", flush=True)
        for _ in range(36000):  # ends early on SIGTERM (sleep resumes after a handler)
            time.sleep(0.1)
            if _sigterm is not None and _sigterm.requested:
                return


def _crossed(every: int | None, before: int, after: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(before, after]`` (k steps per call)."""
    return every is not None and after // every > before // every


def _data_signature(data: Any) -> dict[str, Any] | None:
    """What must match for a resumed run to see the same batches in the same order."""
    if isinstance(data, GrainData):
        return data.signature
    if not isinstance(data, ArrayDataset):
        return None
    return {
        "seed": data.seed,
        "shuffle": data.shuffle,
        "batch_size": data.batch_size,
        "num_examples": data.num_examples,
        "drop_remainder": data.drop_remainder,
    }


def _peak_flops(mesh: Mesh) -> float | None:
    """Peak FLOP/s of all the mesh's devices together (None when the chip is unknown)."""
    devices = list(mesh.devices.flat)
    per_device = perf_lib.peak_flops(devices[0])["peak_flops_per_device"]
    return None if per_device is None else per_device * len(devices)


def _is_ready(metrics: Mapping[str, Any]) -> bool:
    """Whether a step's metrics are computed already (asks, never waits)."""
    for v in metrics.values():
        if isinstance(v, jax.Array):
            return v.is_ready()
    return True  # restored from a checkpoint: host values


def _throughput(
    flops_per_step: float, steps: int, seconds: float, peak: float | None
) -> dict[str, float | None]:
    """Achieved FLOP/s and MFU of a logging interval (``mfu`` None when the peak is unknown).

    ``seconds`` is the interval's device-synchronised time (see `fit`'s ``emit_closed``).
    """
    achieved = flops_per_step * steps / max(seconds, 1e-9)
    return {"model_flops_per_second": achieved, "mfu": achieved / peak if peak else None}


def _throughput_postfix(t: Mapping[str, float | None]) -> dict[str, str]:
    """The progress bar's view of `_throughput`: TFLOP/s and MFU in percent."""
    mfu = "unknown" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
    achieved = t["model_flops_per_second"]
    return {"tflops": "n/a" if achieved is None else f"{achieved / 1e12:.3g}", "mfu": mfu}


def fit(
    state: TrainState,
    train_step: CompiledStep | Callable,
    train_data: ArrayDataset | GrainData | Iterable | Callable,
    *,
    epochs: int | None = None,
    num_steps: int | None = None,
    eval_step: CompiledStep | Callable | None = None,
    eval_data: ArrayDataset | Iterable | None = None,
    eval_every: int | None = None,
    log_every: int = 50,
    mesh: Mesh | None = None,
    hooks: Sequence[PeriodicHook | EventHook] = (),
    early_stopping: EarlyStopping | None = None,
    writers: Sequence[Writer] = (),
    progress: bool = True,
    start: DataPosition | None = None,
    checkpointer: Any = None,
    save_every: int | None = None,
    save_at_epoch_end: bool = True,
    resume: bool | str = False,
    config: Mapping[str, Any] | None = None,
    flops_per_step: float | None = None,
) -> tuple[TrainState, History]:
    """Runs the training loop: epochs or a step budget, evaluation, logging, checkpoints.

    ``epochs`` and ``num_steps`` are totals for the run, as in Keras and Lightning:
    training stops after epoch ``epochs - 1`` or once ``state.step`` reaches
    ``num_steps``, so a resumed run stops exactly where the uninterrupted one would.

    Args:
        state: the initial `TrainState`. fit copies it onto ``mesh`` once, so the
            caller's arrays stay valid although every step donates its input.
        train_step: from `make_train_step`.
        train_data: an `ArrayDataset`, a `jaxtrain.GrainData` (a grain pipeline; its
            iterator state is saved with checkpoints), a callable ``epoch -> iterable of
            batches``, or an iterable of dict batches (re-iterated each epoch if it can be).
        epochs: train until this many epochs are complete (counted from epoch 0).
        num_steps: train until ``state.step == num_steps``; with ``epochs`` too,
            whichever comes first.
        eval_step: from `make_eval_step`; needs ``eval_data``.
        eval_data: evaluated at the end of each epoch (or every ``eval_every`` steps
            if given) and at the end.
        eval_every: evaluate every this many global steps (default: at epoch ends).
        log_every: read training metrics back every this many global steps (the only
            periodic host sync); also at epoch ends and before each checkpoint.
        mesh: the data mesh; default all devices (`jaxtrain.data_mesh`). A mesh from
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
        save_every: save every this many global steps (None: only epoch ends and end).
        save_at_epoch_end: save after each epoch's evaluation.
        resume: True continues from the newest committed checkpoint (restoring state,
            data position, metrics history and early-stopping counters; error if
            there is none); ``"auto"`` does so when one exists and starts afresh
            otherwise.
        config: JSON-ready run configuration stored in every checkpoint.
        flops_per_step: FLOPs of one training step on all devices (e.g. from
            `jaxtrain.step_flops`). Then each train record also has
            ``model_flops_per_second`` and ``mfu`` (against `jaxtrain.peak_flops` of the
            mesh's devices; None where the peak is unknown, as on CPU), and the progress
            bar shows TFLOP/s and MFU ("unknown" there). From the interval's
            device-synchronised time, as ``examples_per_second`` (see `History`): no
            extra host sync.

    Returns:
        ``(final_state, history)``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> model = jt.from_function(lambda p, x: x @ p["w"])  # logits [B, 2]
        >>> opt = optax.sgd(0.5)
        >>> state = jt.TrainState.create({"w": jnp.zeros((3, 2))}, opt, jax.random.key(0))
        >>> train_step = jt.make_train_step(jt.classification_loss(model), opt)
        >>> data = {"x": np.eye(3, dtype=np.float32)[[0, 1, 0, 1]], "y": np.array([0, 1, 0, 1])}
        >>> state, history = fit(state, train_step, jt.ArrayDataset(data, 2), epochs=3,
        ...                      progress=False)
        >>> int(state.step), history.steps, train_step.trace_count  # 2 batches x 3 epochs
        (6, 6, 1)
        >>> history.train[-1]["loss"] < history.train[0]["loss"]
        True
    """
    if epochs is None and num_steps is None:
        raise ValueError("fit needs epochs=... or num_steps=... (or both); got neither.")
    for name, v in (("epochs", epochs), ("num_steps", num_steps), ("log_every", log_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    for name, v in (("eval_every", eval_every), ("save_every", save_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer or None; got {v!r}.")
    if (eval_step is None) != (eval_data is None):
        raise ValueError("eval_step and eval_data go together: give both or neither.")
    if early_stopping is not None and eval_step is None:
        raise ValueError("early_stopping watches an eval metric: give eval_step and eval_data.")
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            f"early_stopping must be a jaxtrain.EarlyStopping; got {type(early_stopping).__name__}."
        )
    if early_stopping is not None:
        names = _eval_metric_names(eval_step, state, eval_data)
        if names is not None and early_stopping.metric not in names:
            raise ValueError(
                f"early_stopping.metric={early_stopping.metric!r} is not a metric of the "
                f"evaluation, which reports {sorted(names)}. Fix: "
                f"EarlyStopping({sorted(names)[0]!r}, ...) or another of those names."
            )
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be True, False or 'auto'; got {resume!r}.")
    if flops_per_step is not None and (
        isinstance(flops_per_step, bool)
        or not isinstance(flops_per_step, (int, float, np.integer, np.floating))
        or not math.isfinite(flops_per_step)
        or flops_per_step <= 0
    ):
        raise ValueError(
            f"flops_per_step must be a positive number of FLOPs or None; got {flops_per_step!r}. "
            "Fix: pass jaxtrain.step_flops(train_step, state, batch), or leave it out when "
            "the backend gives no cost analysis (step_flops returned None)."
        )
    if (resume or save_every) and checkpointer is None:
        raise ValueError(
            "resume and save_every need a checkpointer: pass "
            "checkpointer=jaxtrain.checkpoint.Checkpointer(directory)."
        )

    for hook in hooks:
        if not isinstance(hook, (PeriodicHook, EventHook)):
            raise TypeError(
                f"hooks must be PeriodicHook or EventHook objects; got {type(hook).__name__}. "
                "Fix: wrap the function, e.g. PeriodicHook(100, fn) or EventHook('epoch_end', fn)."
            )
    mesh = data_mesh() if mesh is None else mesh
    history = History()
    best_value, bad_evals = None, 0
    restored_pending: list = []
    resumed_step = None  # already saved: fit never saves it again
    signature = _data_signature(train_data)
    if resume and (resume is True or checkpointer.latest_step() is not None):
        restored = checkpointer.restore(state, mesh=mesh)
        meta = restored.meta
        if signature is not None and meta.get("data") not in (None, signature):
            raise ValueError(
                f"cannot resume exactly: the checkpoint at step {restored.step} was trained on "
                f"data {meta.get('data')} but train_data is {signature}. Fix: resume with the "
                "same data set, batch size and seed."
            )
        state = restored.state
        start = DataPosition.from_dict(meta["position"])
        if isinstance(train_data, GrainData):  # its grain iterator state, checked now
            train_data.restore(meta.get("data_state"), start, restored.step)
        saved = meta.get("history", {})
        history.train, history.eval = list(saved.get("train", [])), list(saved.get("eval", []))
        history.best_eval = saved.get("best_eval")
        es = meta.get("early_stopping") or {}
        best_value, bad_evals = es.get("best"), int(es.get("bad_evals", 0))
        restored_pending = list(meta.get("pending_metrics") or [])
        resumed_step = restored.step
    else:
        # A private copy: the step donates its input, and the caller's state (and the
        # params it was built from) must stay usable after fit returns.
        # Replicated, or split by the FSDP rule on a mesh with an `fsdp` axis.
        state = shard_state(state, mesh, copy=True)
    start = DataPosition() if start is None else start

    step = int(jax.device_get(state.step))  # one sync at the start, none per step
    per_epoch = (
        train_data.steps_per_epoch if isinstance(train_data, (ArrayDataset, GrainData)) else None
    )
    if per_epoch is not None and start.index >= per_epoch:
        start = DataPosition(start.epoch + 1, 0)
    total = None if num_steps is None else max(num_steps - step, 0)
    if epochs is not None and per_epoch is not None:
        by_epochs = max((epochs - start.epoch) * per_epoch - start.index, 0)
        total = by_epochs if total is None else min(total, by_epochs)
    last_epoch = math.inf if epochs is None else epochs

    # With several processes only process 0 shows progress and writes logs; every
    # process computes the same (global) metrics and keeps the same History.
    primary = jax.process_index() == 0
    bar = tqdm(
        total=total, disable=not (progress and primary), unit="step", dynamic_ncols=True, leave=True
    )
    pending: list = restored_pending
    pending_count = len(restored_pending)  # steps in `pending` (a fused call holds k)
    # Timed work of the open interval: calls after the first (compiling) one.
    interval_examples, interval_start = 0, None
    t_start = time.perf_counter()
    last_done = None  # when the newest read-back interval finished on the device
    compile_before = getattr(train_step, "compile_seconds", 0.0)
    epoch, index = start.epoch, start.index
    last_eval_step = history.eval[-1]["step"] if history.eval else None
    last_save_step = resumed_step

    def emit(record: dict) -> None:
        for w in writers if primary else ():
            w.write(record)

    lagged: list = []  # closed logging intervals whose metrics are not read back yet
    interval_steps = 0  # steps run (not restored) in the open interval, for FLOP/s
    peak = _peak_flops(mesh) if flops_per_step is not None else None

    def watch_intervals() -> None:
        """Notes when closed intervals finish on the device: asks, never waits.

        Dispatch is asynchronous, so the time an interval was dispatched says nothing
        about the device. Called after every dispatch and at every close, this asks
        (``is_ready``: no transfer, no wait) whether the oldest unfinished closed
        interval's last step is done, and stamps it the first time it is.
        """
        for entry in lagged:
            if entry["done"] is None:
                if not _is_ready(entry["metrics"][-1]):
                    return
                entry["done"] = time.perf_counter()

    def emit_closed(keep: int = 0) -> None:
        """Reads back and records closed intervals, all but the newest ``keep``.

        Each interval's time is device-synchronised: it ended when its last step was
        seen finished (`watch_intervals`, or here, waiting for it at the read-back that
        needs its values anyway), and began where the previous one ended (host time
        spent loading data in between is training time too) or, after the first
        (compiling) call or an evaluation, when its first step could start.
        """
        nonlocal last_done
        while len(lagged) > keep:
            entry = lagged.pop(0)
            metrics = entry["metrics"]
            if entry["done"] is None:
                if not _is_ready(metrics[-1]):
                    jax.block_until_ready(metrics[-1])  # the read below waits anyway
                entry["done"] = time.perf_counter()
            record = {"step": entry["step"], "epoch": entry["epoch"], "split": "train"}
            record.update(_mean_records(metrics, entry["first"], train_step))
            started = entry["started"] if last_done is None else last_done
            last_done = entry["done"]
            seconds = None if started is None else last_done - started
            examples = entry["examples"]
            ex_s, flops_s = None, None
            if examples and seconds is not None and seconds > 0:
                ex_s = examples / seconds
                history.steady_seconds += seconds
                if flops_per_step is not None:
                    flops_s = _throughput(flops_per_step, entry["steps"], seconds, peak)
            elif flops_per_step is not None:  # only the compiling call: no steady time
                flops_s = {"model_flops_per_second": None, "mfu": None}
            record["examples_per_second"] = ex_s
            postfix = {
                "loss": f"{record['loss']:.4f}",
                "ex_s": "n/a" if ex_s is None else f"{ex_s:.0f}",
            }
            if flops_s is not None:
                record.update(flops_s)
                postfix.update(_throughput_postfix(flops_s))
            history.train.append(record)
            emit(record)
            bar.set_postfix(postfix, refresh=False)

    def log_train(lag: bool = False) -> None:
        """Closes the current interval and records the closed ones.

        With ``lag`` (periodic logging) the newest interval is read back one interval
        later, when the device has long finished it: the host never waits on it.
        """
        nonlocal pending, pending_count, interval_examples, interval_start, interval_steps
        if pending:
            lagged.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "metrics": pending,
                    "first": step - pending_count,
                    "examples": interval_examples,  # timed: the first call left out
                    "steps": interval_steps,
                    "started": interval_start,
                    "done": None,  # when its last step was seen finished on the device
                }
            )
            pending, pending_count, interval_examples, interval_start = [], 0, 0, None
            interval_steps = 0
            watch_intervals()
        emit_closed(keep=1 if lag else 0)

    due: list = []  # hooks due at the current step; they run after fit's own work for it

    def hooks_due(event: str, prev: int = 0) -> None:
        for hook in hooks:
            if (
                isinstance(hook, PeriodicHook)
                if event == "step"
                else isinstance(hook, EventHook) and hook.on == event
            ) and (event != "step" or _crossed(hook.every_steps, prev, step)):
                due.append(hook)

    def run_hooks() -> None:
        """Runs the due hooks once each, in the order of ``hooks``."""
        todo = [hook for hook in hooks if any(hook is d for d in due)]
        due.clear()
        for hook in todo:
            hook.fn(state, history)

    def run_eval(record_epoch: int) -> bool:
        """Evaluates, logs; returns True when early stopping says stop."""
        nonlocal best_value, bad_evals, last_eval_step, last_done
        if eval_step is None:
            return False
        log_train()
        record = {"step": step, "epoch": record_epoch, "split": "eval"}
        _debug_pause("eval")
        record.update(evaluate(eval_step, state, eval_data, mesh))
        last_done = None  # throughput: the next interval starts at its first step, not here
        history.eval.append(record)
        last_eval_step = step
        emit(record)
        hooks_due("eval_end")
        if early_stopping is None:
            return False
        if early_stopping.metric not in record:
            raise KeyError(
                f"early_stopping.metric={early_stopping.metric!r} is not an eval metric; "
                f"available: {sorted(k for k in record if k not in ('step', 'epoch', 'split'))}."
            )
        value = record[early_stopping.metric]
        if early_stopping.improved(value, best_value):
            best_value, bad_evals = value, 0
            history.best_eval = dict(record)
        else:
            bad_evals += 1
        return bad_evals >= early_stopping.patience

    def save() -> None:
        nonlocal last_save_step
        if checkpointer is None or last_save_step == step:
            return
        emit_closed()  # closed intervals go into the history saved below
        pos = DataPosition(epoch, index)
        if per_epoch is not None and index >= per_epoch:
            pos = DataPosition(epoch + 1, 0)
        latest_eval = (
            history.eval[-1] if history.eval and history.eval[-1]["step"] == step else None
        )
        meta = {
            "position": pos.to_dict(),
            "data": signature,
            "data_state": (
                train_data.iterator_state(pos) if isinstance(train_data, GrainData) else None
            ),
            "history": {
                "train": history.train,
                "eval": history.eval,
                "best_eval": history.best_eval,
            },
            "early_stopping": {"best": best_value, "bad_evals": bad_evals},
            # Metrics of steps since the last log record: a resumed run folds them into
            # its next record exactly as the uninterrupted run would (a host read, but
            # only at save time).
            "pending_metrics": [
                {k: v.item() for k, v in m.items()} for m in per_step_metrics(pending)
            ],
            "config": dict(config) if config else None,
        }
        checkpointer.save(step, state, meta=meta, eval_metrics=latest_eval)
        last_save_step = step
        _debug_pause("save")

    stop = False
    same_shapes = _SameShapes()
    fused_k = getattr(train_step, "steps_per_call", None)
    resident = getattr(train_step, "device_epoch", None)
    if resident is not None:
        if resident is not train_data:
            raise ValueError(
                "a step from make_device_epoch runs the data set it was built with: pass that "
                "same ArrayDataset as train_data."
            )
        if start.index or (num_steps is not None and (num_steps - step) % per_epoch):
            raise ValueError(
                "a device-resident epoch runs whole epochs: start at a batch index of 0 and "
                f"use epochs= (or num_steps in multiples of {per_epoch}); got start={start}, "
                f"num_steps={num_steps}."
            )
        from jaxtrain.resident import put_dataset

        device_arrays = put_dataset(train_data, mesh)
        resident_n = train_data.num_examples

    global _sigterm
    sigterm = _sigterm = _Sigterm(checkpointer is not None)

    def stop_if_preempted() -> None:
        if sigterm.requested:
            save()
            checkpointer.wait()
            raise Preempted(step, checkpointer.directory)

    try:
        while epoch < last_epoch and not stop and (num_steps is None or step < num_steps):
            ran_in_epoch = 0
            left = math.inf if num_steps is None else num_steps - step
            if resident is not None:
                calls = [(per_epoch, resident_n, jnp.int32(epoch))]
            else:
                batches = _epoch_batches(train_data, epoch, index, mesh)
                calls = _prefetch_calls(batches, mesh, fused_k, left, same_shapes, train_step)
            for k, n_real, batch in calls:
                # Hooks due at the previous step run now: it was not the epoch's last
                # (whose hooks wait for the epoch-end evaluation), and the state is
                # still that step's.
                run_hooks()
                t0 = time.perf_counter()
                if resident is not None:
                    state, step_metrics = train_step(state, device_arrays, batch)
                else:
                    state, step_metrics = train_step(state, batch)
                if history.steps == 0:
                    # The first call traces and compiles synchronously; block so the
                    # measured time is the compile, not just the dispatch. Timed
                    # (steady) work starts once it is done.
                    jax.block_until_ready(step_metrics)
                    interval_start = time.perf_counter()
                    history.first_step_seconds = interval_start - t0
                else:
                    history.steady_examples += n_real
                    history.steady_steps += k
                    interval_examples += n_real
                    interval_steps += k
                    if interval_start is None:
                        interval_start = t0
                watch_intervals()
                pending.append(step_metrics)
                pending_count += k
                prev = step
                step += k
                index += k
                ran_in_epoch += k
                history.steps += k
                history.examples += n_real
                bar.update(k)
                _debug_pause("step")

                if _crossed(log_every, prev, step):
                    log_train(lag=True)
                if _crossed(eval_every, prev, step):
                    stop = run_eval(epoch)
                hooks_due("step", prev)
                if _crossed(save_every, prev, step):
                    save()
                stop_if_preempted()
                if stop or (num_steps is not None and step >= num_steps):
                    stop = True
                    break
            if ran_in_epoch == 0 and index == 0:
                raise ValueError(f"train_data yielded no batches in epoch {epoch}.")
            if stop:
                break
            log_train()
            epoch, index = epoch + 1, 0
            if eval_every is None:
                stop = run_eval(epoch - 1)
            if save_at_epoch_end:
                save()
            hooks_due("epoch_end")
            run_hooks()
            stop_if_preempted()
        history.stopped_early = bool(
            stop and early_stopping is not None and bad_evals >= early_stopping.patience
        )
        # Save before this call's closing log record and evaluation: they belong to this
        # call, and a run resumed from here must log exactly what an uninterrupted one does.
        save()
        log_train()
        if eval_step is not None and last_eval_step != step:
            run_eval(epoch - 1 if index == 0 else epoch)
        if per_epoch is not None and index >= per_epoch:  # the budget ended an epoch
            hooks_due("epoch_end")
        run_hooks()
        jax.block_until_ready(state)
    finally:
        sigterm.restore()
        _sigterm = None
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()  # never leave an asynchronous save behind
    history.wall_seconds = time.perf_counter() - t_start
    history.compile_seconds = getattr(train_step, "compile_seconds", 0.0) - compile_before
    if per_epoch is not None and index >= per_epoch:  # stopped right at an epoch end
        epoch, index = epoch + 1, 0
    history.position = DataPosition(epoch, index)
    return state, history
