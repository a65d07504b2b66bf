"""Throughput and model FLOPs utilisation (MFU) of a compiled train step.

FLOPs per step are the step's *model FLOPs*, counted from its jaxpr (`jaxpr_flops`): the
matrix products and convolutions, a multiply-add counting 2, the convention of the
``6 * N * tokens`` formula. The count does not depend on the backend. XLA's cost analysis
is only a fallback (`step_flops_source` says which was used): on GPUs it misses the
matrix products that became cuBLAS calls (measured on an H200: 3.2x too few FLOPs for a
transformer step). The peak comes from a table of dense bfloat16 peaks per chip, matched
on ``device.device_kind``; on CPU, and on chips not in the table, the peak and the MFU
are unknown (None).

Example:
    >>> flops = step_flops(train_step, state, batch)  # doctest: +SKIP
    >>> perf_summary(flops, steps_per_second=120.0, devices=jax.devices())  # doctest: +SKIP
    {'flops_per_step': 3.2e+07, 'model_flops_per_second': 3.8e+09, 'mfu': 0.014, ...}

What must not live here: the loop's throughput log (`jaxtrain.train_log`). It never imports
the loop, the applications (`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.monitoring
from jax.extend import core as jax_core

TFLOPS = 1e12

# (substring of device.device_kind, lower case; chip name; dense bf16 peak FLOP/s per
# chip; JAX devices per chip). First match wins, so specific names come first. TPU v2 and
# v3 show each of a chip's two TensorCores as its own JAX device, so a device has half
# the chip's peak; from v4 on one device is one chip. JAX calls v5e "TPU v5 lite", v6e
# "TPU v6 lite" and v5p "TPU v5".
PEAKS: tuple[tuple[str, str, float, int], ...] = (
    ("tpu v6 lite", "TPU v6e", 918 * TFLOPS, 1),
    ("tpu v6e", "TPU v6e", 918 * TFLOPS, 1),
    ("tpu v5 lite", "TPU v5e", 197 * TFLOPS, 1),
    ("tpu v5e", "TPU v5e", 197 * TFLOPS, 1),
    ("tpu v5p", "TPU v5p", 459 * TFLOPS, 1),
    ("tpu v5", "TPU v5p", 459 * TFLOPS, 1),
    ("tpu v4", "TPU v4", 275 * TFLOPS, 1),
    ("tpu v3", "TPU v3", 123 * TFLOPS, 2),
    ("tpu v2", "TPU v2", 45 * TFLOPS, 2),
    ("h200", "NVIDIA H200", 989 * TFLOPS, 1),
    ("h100 pcie", "NVIDIA H100 PCIe", 756 * TFLOPS, 1),
    ("h100", "NVIDIA H100 SXM", 989 * TFLOPS, 1),
    ("a100", "NVIDIA A100", 312 * TFLOPS, 1),
)


def peak_flops(device: Any = None) -> dict[str, Any]:
    """The dense bfloat16 peak of one JAX device, from the `PEAKS` table.

    Args:
        device: a ``jax.Device`` (or anything with ``device_kind``); default
            ``jax.devices()[0]``.

    Returns:
        ``{"device_kind", "chip", "peak_flops_per_device", "source"}``; ``chip`` and
        ``peak_flops_per_device`` are None and ``source`` is ``"unknown"`` when the kind
        is not in the table (every CPU).

    Example:
        >>> peak_flops(jax.devices("cpu")[0])["peak_flops_per_device"] is None
        True
    """
    device = jax.devices()[0] if device is None else device
    kind = str(getattr(device, "device_kind", device))
    low = kind.lower()
    for pattern, chip, per_chip, per_chip_devices in PEAKS:
        if pattern in low:
            per_device = per_chip / per_chip_devices
            split = f", {per_chip_devices} devices per chip" if per_chip_devices > 1 else ""
            return {
                "device_kind": kind,
                "chip": chip,
                "peak_flops_per_device": per_device,
                "source": f"table: {chip}, {per_chip / TFLOPS:g} TFLOP/s bf16 per chip{split}",
            }
    return {"device_kind": kind, "chip": None, "peak_flops_per_device": None, "source": "unknown"}


def _flops_from_cost(cost: Any) -> float | None:
    """``flops`` of a cost analysis, which JAX versions return as a dict, a list of dicts
    (one per computation; the first is the entry computation) or None."""
    if isinstance(cost, Sequence) and not isinstance(cost, (str, bytes)):
        cost = cost[0] if len(cost) else None
    if not isinstance(cost, Mapping):
        return None
    try:
        flops = float(cost["flops"])
    except (KeyError, TypeError, ValueError):
        return None
    return flops if flops > 0 else None


def _num_devices(compiled: Any) -> int:
    """Devices the compiled program runs on (its inputs' shardings), 1 if unknown."""
    try:
        shardings = jax.tree.leaves(compiled.input_shardings)
        return max((int(s.num_devices) for s in shardings), default=1)
    except Exception:
        return 1


# --- Model FLOPs from the jaxpr ----------------------------------------------------------
# Primitives whose work is opaque to a jaxpr walk: a Pallas kernel's jaxpr is one block of
# a grid whose extent the walk cannot read reliably; counting it once would be a guess.
_OPAQUE = frozenset({"pallas_call"})
# cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`, what
# `jaxtrain.models.TransformerLM` uses on NVIDIA GPUs) is one primitive for the forward
# pass and one for the backward, not dot_generals: counted as XLA's attention counts,
# q k^T and p v forward (2 products), four products backward. Value: products per call.
_FUSED_ATTENTION = {
    "dot_product_attention_fwd": 2,
    "dot_product_attention_fwd_wrapper": 2,
    "dot_product_attention_bwd": 4,
    "dot_product_attention_bwd_wrapper": 4,
}


def _sub_jaxprs(params: Mapping[str, Any]) -> list[Any]:
    """The jaxprs in an equation's parameters (a pjit's body, a remat's, a custom rule's)."""
    found = []
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
                found.append(v)
    return found


def _dot_flops(eqn: Any) -> int:
    """2 x output elements x contracted elements (batch dims are in the output)."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    return 2 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _conv_flops(eqn: Any) -> int:
    """2 x output elements x (kernel window x in-channels per group).

    The kernel's in-channel dimension already holds in-channels / feature_group_count, so
    each output element costs the kernel's size over its out-channel dimension. Padding
    and dilation zeros count as work (model FLOPs, not XLA's exact valid-tap count).
    """
    rhs_shape = eqn.invars[1].aval.shape
    out_channels_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs_shape) // rhs_shape[out_channels_dim]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _attention_product_flops(eqn: Any) -> int:
    """2 x B x N x T x S x H: one [T, H] x [H, S] product per batch and head.

    Operands are query ``[B, T, N, H]`` and key/value ``[B, S, K, H]`` (``layout`` 0), or
    ``[B, N, T, H]`` / ``[B, K, S, H]`` (``layout`` 1, cuDNN's BNTH).
    """
    query, _, value = (v.aval.shape for v in eqn.invars[:3])
    seq_axis = 2 if eqn.params.get("layout") == 1 else 1
    return 2 * math.prod(query) * value[seq_axis]


def _shard_map_devices(params: Mapping[str, Any]) -> int:
    """How many copies of a shard_map body run: the sizes of its manual mesh axes."""
    mesh = params.get("mesh")
    axes = params.get("newly_manual_axes", params.get("manual_axes"))
    if mesh is None or axes is None:
        return 1
    return math.prod(int(mesh.shape[a]) for a in axes)


def _count(jaxpr: Any) -> int:
    """Model FLOPs of a ``Jaxpr`` or ``ClosedJaxpr``, nested jaxprs included."""
    inner = jaxpr.jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jaxpr
    total = 0
    for eqn in inner.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name in _FUSED_ATTENTION:
            total += _FUSED_ATTENTION[name] * _attention_product_flops(eqn)
        elif name == "scan":
            total += int(params["length"]) * _count(params["jaxpr"])
        elif name == "cond":  # one branch runs; which is unknown when tracing
            total += max((_count(b) for b in params["branches"]), default=0)
        elif name == "while":  # trip count unknown when tracing: one iteration
            total += _count(params["cond_jaxpr"]) + _count(params["body_jaxpr"])
        elif name == "shard_map":  # the body sees one shard; it runs on each device
            total += _shard_map_devices(params) * sum(_count(j) for j in _sub_jaxprs(params))
        elif name not in _OPAQUE:  # pjit, closed_call, remat, custom_jvp/vjp: once
            total += sum(_count(j) for j in _sub_jaxprs(params))
    return total


def jaxpr_flops(fn: Any, *args: Any) -> float:
    """Model FLOPs of one call of ``fn``, counted from its jaxpr.

    Traces ``jax.make_jaxpr(fn)(*args)`` (abstractly: nothing is compiled or run) and adds
    up the matrix products and convolutions, a multiply-add counting 2:

    - ``dot_general``: 2 x output elements x contracted elements (batch dimensions are
      part of the output, so a batched matmul counts every batch once);
    - ``conv_general_dilated``: 2 x output elements x kernel window x in-channels per
      feature group (padding and dilation zeros count, as in the analytic formula);
    - nested jaxprs: ``pjit``, ``closed_call``, ``remat``/``checkpoint`` and the custom
      JVP/VJP calls once (a rematerialised forward appears, and counts, twice); a ``scan``
      times its length; a ``cond`` its most expensive branch; a ``while`` loop's body
      *once*, because its trip count is not known when tracing; a ``shard_map`` body
      once per device of its mesh axes. A Pallas kernel (``pallas_call``) counts 0.

    Elementwise work (activations, LayerNorm, softmax, the optimizer update) is not
    counted: these are the *model FLOPs* of MFU, the convention of ``6 * N * tokens``.
    The count is global (the program before partitioning over devices) and does not
    depend on the dtype or the backend, unlike XLA's cost analysis, which on GPUs misses
    the matrix products that became cuBLAS calls.

    Args:
        fn: a function, a ``jax.jit`` function, or a `jaxtrain.CompiledStep` (its jitted
            function is traced, which reuses the trace of an earlier call or lowering with
            the same shapes: ``trace_count`` does not change).
        *args: its arguments: arrays or ``jax.ShapeDtypeStruct`` s (only shapes and dtypes
            are read; a donated state stays valid).

    Returns:
        FLOPs of one call (0.0 when it has no matrix product or convolution).

    Example:
        >>> import jax.numpy as jnp
        >>> x, w = jax.ShapeDtypeStruct((8, 16), jnp.float32), jnp.ones((16, 4))
        >>> jaxpr_flops(lambda x, w: jnp.tanh(x @ w), x, w)  # 2 * 8 * 16 * 4; tanh is free
        1024.0
    """
    target, call_args, uncounted = fn, args, contextlib.nullcontext()
    if hasattr(fn, "jitted") and hasattr(fn, "uncounted"):  # a jaxtrain.CompiledStep
        call_args = fn.complete_args(args)  # a fused step's implicit `active`
        target = fn.jitted
        # A jitted step's trace here is the one its compilation reuses, so it counts. A
        # step built with jit=False traces its counting body directly; there trace_count
        # counts calls, and an abstract trace is not one.
        if not hasattr(target, "lower"):
            uncounted = fn.uncounted()
    with uncounted:
        closed = jax.make_jaxpr(target)(*call_args)
    return float(_count(closed))


# How the last step_flops of each step counted (see step_flops_source).
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _record(step: Any, source: str | None) -> None:
    try:
        _SOURCES[step] = source
    except TypeError:  # not weak-referenceable: step_flops_source says None
        pass


def step_flops_source(step: Any) -> str | None:
    """How the last `step_flops` of ``step`` counted its FLOPs.

    Args:
        step: the step given to `step_flops`.

    Returns:
        ``"jaxpr"`` (model FLOPs, `jaxpr_flops`: the normal case); ``"xla-lowered: ..."``
        or ``"xla-compiled: ..."`` when the jaxpr walk failed or found no matrix product
        and XLA's cost analysis of the lowered (global) or compiled (per device, times
        the device count) program was used instead, with the reason after the colon;
        None when `step_flops` has not counted this step or returned None.

    Example:
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x, w: x @ w)
        >>> step_flops(f, jnp.ones((8, 16)), jnp.ones((16, 4)))
        1024.0
        >>> step_flops_source(f)
        'jaxpr'
    """
    try:
        return _SOURCES.get(step)
    except TypeError:
        return None


def step_flops(step: Any, *args: Any) -> float | None:
    """Model FLOPs of one call of a jit-compiled step, all its devices together.

    Counts the matrix products and convolutions of the step's jaxpr (`jaxpr_flops`):
    backend- and dtype-independent, and global, so no per-device multiplication. Only
    when that walk fails (or finds no matrix product) does it fall back to XLA's cost
    analysis; `step_flops_source` says which count was used.

    It also lowers and compiles ``step`` for ``args`` and adds the compile time to the
    step's ``compile_seconds``: fit's first call with the same shapes and shardings then
    reuses this program (no retrace, no new compilation; the jaxpr reuses the trace).

    Args:
        step: a `jaxtrain.CompiledStep` or a ``jax.jit`` function (anything with
            ``.lower(*args)``).
        *args: arguments of one call, e.g. ``(state, batch)`` placed as in training
            (``jaxtrain.shard_batch(batch, mesh)``). Nothing is executed, so a donated
            state stays valid.

    Returns:
        FLOPs per call (a multiply-add counts 2), or None when neither the jaxpr nor the
        backend's cost analysis gives a count.

    Example:
        >>> import jax.numpy as jnp
        >>> f = jax.jit(lambda x, w: x @ w)
        >>> step_flops(f, jnp.ones((8, 16)), jnp.ones((16, 4)))  # 2 * 8 * 16 * 4
        1024.0
    """
    if not hasattr(step, "lower"):
        raise TypeError(
            f"step_flops needs a jit-compiled step with .lower(...); got {type(step).__name__}. "
            "Fix: pass the step from jaxtrain.make_train_step or a jax.jit function."
        )
    COMPILE_CLOCK.install()
    seen = COMPILE_CLOCK.count
    try:
        # The step's first compilation may happen here (fit's first call then reuses it):
        # say so when it is long, and count its time as the step's compile time.
        with CompileNotice(getattr(step, "name", "step"), "compiling to count its FLOPs"):
            lowered = step.lower(*args)
            compiled = lowered.compile()
    finally:
        if hasattr(step, "add_compile_seconds"):
            step.add_compile_seconds(COMPILE_CLOCK.seconds_since(seen))
    try:
        flops: float | None = jaxpr_flops(step, *args)
    except Exception as e:  # e.g. a step that lowers but cannot be traced again
        first_line = (str(e).splitlines() or [""])[0]
        why = f"the jaxpr walk failed ({type(e).__name__}: {first_line})"
    else:
        if flops:
            _record(step, "jaxpr")
            return flops
        why = "the jaxpr has no matrix product or convolution"
    # Fallback: XLA's count, which includes elementwise work. The lowered program is the
    # global one; the optimised one is per device and, on GPUs, misses cuBLAS matmuls.
    try:
        flops = _flops_from_cost(lowered.cost_analysis())
    except NotImplementedError:
        flops = None
    if flops is not None:
        _record(step, f"xla-lowered: {why}")
        return flops
    try:
        flops = _flops_from_cost(compiled.cost_analysis())
    except NotImplementedError:
        flops = None
    if flops is None:
        _record(step, None)
        return None
    _record(step, f"xla-compiled: {why}")
    return flops * _num_devices(compiled)


def steps_per_second(history: Any) -> float | None:
    """Steady training steps per second of a `jaxtrain.History`.

    Steps after the first (compiling) call over their device-synchronised time
    (``History.steady_steps / History.steady_seconds``, the time base of
    ``History.examples_per_second`` and the train records). A `History` built by hand
    without ``steady_seconds`` falls back to the wall time after the first step.

    Args:
        history: the `jaxtrain.History` that `jaxtrain.fit` returned.

    Returns:
        Steps per second; None when fewer than 2 steps ran.

    Example:
        >>> import jaxtrain as jt
        >>> steps_per_second(jt.History(steps=101, wall_seconds=3.0, first_step_seconds=1.0))
        50.0
    """
    steady = getattr(history, "steady_seconds", 0.0)
    if steady > 0 and getattr(history, "steady_steps", 0) > 0:
        return history.steady_steps / steady  # device-synchronised, as fit measures it
    seconds = history.wall_seconds - history.first_step_seconds
    if history.steps < 2 or seconds <= 0:
        return None
    return (history.steps - 1) / seconds


def perf_summary(
    flops_per_step: float | None,
    steps_per_second: float | None,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Achieved FLOP/s and MFU of a run: the fields ``jaxtrain train`` puts in summary.json.

    Args:
        flops_per_step: from `step_flops` (all devices together), or None.
        steps_per_second: from `steps_per_second`, or None.
        devices: the devices the step ran on (default ``jax.devices()``); their peak
            comes from the first one's kind.

    Returns:
        ``{"flops_per_step", "model_flops_per_second", "peak_flops_per_second", "mfu",
        "peak_source"}``: ``model_flops_per_second = flops_per_step * steps_per_second``;
        ``peak_flops_per_second`` is the per-device peak times the device count;
        ``mfu = model_flops_per_second / peak_flops_per_second`` (a fraction, 0.35 is
        35%); each None when unknown (``peak_source`` is then ``"unknown"``, as on CPU).

    Example:
        >>> summary = perf_summary(1e9, 50.0, devices=jax.devices("cpu")[:1])
        >>> summary["model_flops_per_second"], summary["mfu"], summary["peak_source"]
        (50000000000.0, None, 'unknown')
    """
    devices = list(jax.devices() if devices is None else devices)
    peak = peak_flops(devices[0])
    achieved = (
        flops_per_step * steps_per_second
        if flops_per_step is not None and steps_per_second is not None
        else None
    )
    total_peak = (
        peak["peak_flops_per_device"] * len(devices)
        if peak["peak_flops_per_device"] is not None
        else None
    )
    return {
        "flops_per_step": flops_per_step,
        "model_flops_per_second": achieved,
        "peak_flops_per_second": total_peak,
        "mfu": achieved / total_peak if achieved is not None and total_peak else None,
        "peak_source": peak["source"],
    }


# --- Compile time: measured, not guessed -------------------------------------------------
# JAX reports the duration of each tracing, lowering and XLA compilation (or persistent
# cache load) as a monitoring time span. One listener, installed on first use, keeps the
# recent spans with the thread that ran them; a step attributes to itself the spans its
# own call (or lowering) produced, so the figure is the real compile time of that step,
# not the first call's wall time (which also includes running it).
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


class _CompileClock:
    """Collects compile time spans (start, end) by thread from ``jax.monitoring``."""

    def __init__(self) -> None:
        self.count = 0  # spans seen so far (the deque keeps only the newest)
        self.spans: collections.deque = collections.deque(maxlen=4096)
        self.installed = False
        self.lock = threading.Lock()

    def install(self) -> None:
        with self.lock:
            if not self.installed:
                jax.monitoring.register_event_time_span_listener(self._on_span)
                self.installed = True

    def _on_span(self, event: str, start_time: float, end_time: float, **kwargs: Any) -> None:
        if event in _COMPILE_EVENTS:
            self.spans.append((threading.get_ident(), start_time, end_time))
            self.count += 1

    def seconds_since(self, count: int) -> float:
        """Seconds covered by this thread's spans after the first ``count`` (nested ones,
        like an inner jit traced inside the step's trace, count once)."""
        new = list(self.spans)[max(len(self.spans) - (self.count - count), 0) :]
        me = threading.get_ident()
        total, reach = 0.0, -math.inf
        for start, end in sorted((s, e) for t, s, e in new if t == me):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


COMPILE_CLOCK = _CompileClock()


def compile_notice_seconds() -> float:
    """After how many seconds of a first call a "compiling ..." line is printed.

    From the environment variable ``JAXTRAIN_COMPILE_NOTICE_SECONDS`` (default 5;
    ``inf`` turns the line off).

    Returns:
        The threshold in seconds (``inf``: never).

    Raises:
        ValueError: the variable is not a number >= 0.

    Example:
        >>> import os
        >>> before = os.environ.get("JAXTRAIN_COMPILE_NOTICE_SECONDS")
        >>> os.environ["JAXTRAIN_COMPILE_NOTICE_SECONDS"] = "20"
        >>> compile_notice_seconds()
        20.0
        >>> os.environ["JAXTRAIN_COMPILE_NOTICE_SECONDS"] = "inf"  # never
        >>> compile_notice_seconds()
        inf
        >>> if before is None:
        ...     del os.environ["JAXTRAIN_COMPILE_NOTICE_SECONDS"]
        ... else:
        ...     os.environ["JAXTRAIN_COMPILE_NOTICE_SECONDS"] = before
    """
    raw = os.environ.get("JAXTRAIN_COMPILE_NOTICE_SECONDS", "5")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"JAXTRAIN_COMPILE_NOTICE_SECONDS must be a number of seconds >= 0 (or inf); "
            f"got {raw!r}. Fix: e.g. JAXTRAIN_COMPILE_NOTICE_SECONDS=5."
        )
    return value


class CompileNotice:
    """Prints one line when a compilation runs longer than `compile_notice_seconds`.

    A first call of a large step can trace and compile for minutes with nothing on the
    screen; after the threshold a timer thread says what is compiling, and once it is
    done, how long it took. Nothing is printed for a quick compile.

    Args:
        what: what is compiling, as the line names it (e.g. ``"train_step"``).
        detail: why, in a few words.
        after: the threshold in seconds; default `compile_notice_seconds`.

    Example:
        >>> with CompileNotice("train_step"):  # a quick "compile": prints nothing
        ...     pass
    """

    def __init__(
        self,
        what: str,
        detail: str = "first call: tracing and XLA compilation",
        after: float | None = None,
    ):
        self.what = what
        self.detail = detail
        self.after = compile_notice_seconds() if after is None else after
        self.printed = False
        self.timer: threading.Timer | None = None
        self.t0 = 0.0

    def _say(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    def _notice(self) -> None:
        self.printed = True
        self._say(
            f"jaxtrain: compiling {self.what} ({self.detail}), "
            f"{time.perf_counter() - self.t0:.0f} s so far ..."
        )

    def __enter__(self) -> CompileNotice:
        self.t0 = time.perf_counter()
        if math.isfinite(self.after):
            self.timer = threading.Timer(self.after, self._notice)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer.join()
        if self.printed:
            self._say(f"jaxtrain: {self.what} compiled in {time.perf_counter() - self.t0:.1f} s")
