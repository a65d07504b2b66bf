"""Throughput and model FLOPs utilisation (MFU) of a compiled train step.

FLOPs per step come from XLA's cost analysis of the compiled step (the count XLA's own
scheduler uses: a multiply-add is 2 FLOPs; optimizer and elementwise work included).
The peak comes from a table of dense bfloat16 peaks per chip, matched on
``device.device_kind``; on CPU, and on chips not in the table, the peak and the MFU are
unknown (None).

Example:
    >>> flops = step_flops(train_step, state, batch)  # doctest: +SKIP
    >>> perf_summary(flops, steps_per_second=120.0, devices=jax.devices())  # doctest: +SKIP
    {'flops_per_step': 3.2e+07, 'model_flops_per_second': 3.8e+09, 'mfu': 0.014, ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

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
    flops = cost.get("flops")
    try:
        flops = float(flops)
    except (TypeError, ValueError):
        return None
    return flops if flops > 0 else None


def _num_devices(compiled: Any) -> int:
    """Devices the compiled program runs on (its inputs' shardings), 1 if unknown."""
    try:
        shardings = jax.tree.leaves(compiled.input_shardings)
        return max((int(s.num_devices) for s in shardings), default=1)
    except Exception:
        return 1


def step_flops(step: Any, *args: Any) -> float | None:
    """FLOPs of one call of a jit-compiled step, summed over all its devices.

    Lowers and compiles ``step`` for ``args`` (after a first call with the same argument
    shapes and shardings this reuses the compiled program: no retrace, no new
    compilation) and reads XLA's cost analysis. For a step sharded over ``n`` devices
    XLA analyses the per-device program, so its count is multiplied by ``n``.

    Args:
        step: a `jaxtrain.CompiledStep` or a ``jax.jit`` function (anything with
            ``.lower(*args)``).
        *args: arguments of one call, e.g. ``(state, batch)`` placed as in training
            (``jaxtrain.shard_batch(batch, mesh)``). Nothing is executed, so a donated
            state stays valid.

    Returns:
        FLOPs per call (a multiply-add counts 2), or None where the backend gives no
        cost analysis.

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
    try:
        compiled = step.lower(*args).compile()
        cost = compiled.cost_analysis()
    except NotImplementedError:
        return None
    flops = _flops_from_cost(cost)
    return None if flops is None else flops * _num_devices(compiled)


def steps_per_second(history: Any) -> float | None:
    """Steady training steps per second of a `jaxtrain.History`.

    Steps after the first (compiling) one over the loop's wall time after it
    (evaluation and logging included, as for ``History.examples_per_second``).

    Args:
        history: the `jaxtrain.History` that `jaxtrain.fit` returned.

    Returns:
        ``(steps - 1) / (wall_seconds - first_step_seconds)``; None when fewer than 2
        steps ran.

    Example:
        >>> import jaxtrain as jt
        >>> steps_per_second(jt.History(steps=101, wall_seconds=3.0, first_step_seconds=1.0))
        50.0
    """
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
