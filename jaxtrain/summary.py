"""`model_summary`: parameters per module, their bytes, and FLOPs per train step.

What Keras' ``model.summary()`` and Flax's ``nnx.tabulate`` show, for any parameter
pytree: one row per parameter array (path, shape, dtype, count, bytes), totals per
module (the path without its last key) and for the whole model, and, given a compiled
train step and its arguments, the FLOPs of one step (`jaxtrain.perf.step_flops`: the
model FLOPs of the step's jaxpr, XLA's cost analysis as the fallback;
``flops_source`` says which). ``jaxtrain train`` prints `ModelSummary.format` at start.

What must not live here: the FLOP counting itself (`jaxtrain.perf`). It never imports
the loop, the CLI or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxtrain.types import PyTree

__all__ = ["ModelSummary", "ParamRow", "model_summary"]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter array.

    Attributes:
        path: its keys joined by ``/`` (``Conv_0/kernel``).
        shape: its shape.
        dtype: its dtype's name (``float32``).
        count: its number of elements.
        bytes: its size in bytes (``count * itemsize``).
        trainable: False for a model-state array (``batch_stats`` of a BatchNorm:
            Keras' "non-trainable params"), whose path starts with its collection.

    Example:
        >>> import jax.numpy as jnp
        >>> row = model_summary({"Dense_0": {"kernel": jnp.zeros((3, 2))}}).rows[0]
        >>> row.path, row.shape, row.dtype, row.count, row.bytes, row.module
        ('Dense_0/kernel', (3, 2), 'float32', 6, 24, 'Dense_0')
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    count: int
    bytes: int
    trainable: bool = True

    @property
    def module(self) -> str:
        """The path without its last key (``""`` for a top-level array)."""
        return self.path.rpartition("/")[0]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover - the loop returns


def _human_flops(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}FLOP"
    return f"{n:g} FLOP"


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """A model's parameters and the cost of one train step (`model_summary`).

    Attributes:
        rows: one `ParamRow` per parameter array, in pytree order, then one per
            model-state array (``trainable=False``) when ``model_state`` was given.
        total_params: the number of parameters (trainable: model state not included).
        total_bytes: their size in bytes.
        state_values: the number of model-state values (BatchNorm statistics), 0 if none.
        state_bytes: their size in bytes.
        flops_per_step: FLOPs of one training step (a multiply-add counts 2): one call
            of the step, divided by its K for fused steps (``spec.steps_per_call``); or
            None (no step given, or no count available).
        flops_source: how they were counted (`jaxtrain.perf.step_flops_source`).
        name: the model's name for the title, or ``""``.

    Example:
        >>> import jax.numpy as jnp
        >>> s = model_summary({"w": jnp.zeros((2, 3), jnp.bfloat16)})
        >>> print(s.format("param"))
        model summary
        path  shape  dtype     params  bytes
        w     2x3    bfloat16       6   12 B
        total: 6 parameters, 12 B (bfloat16)
        >>> s.to_dict()["params"][0]["shape"]
        [2, 3]
    """

    rows: tuple[ParamRow, ...]
    total_params: int
    total_bytes: int
    flops_per_step: float | None = None
    flops_source: str | None = None
    name: str = ""
    state_values: int = 0
    state_bytes: int = 0

    def modules(self) -> list[tuple[str, int, int, list[ParamRow]]]:
        """``(module, params, bytes, rows)`` per module, in first-seen order."""
        grouped: dict[str, list[ParamRow]] = {}
        for row in self.rows:
            grouped.setdefault(row.module, []).append(row)
        return [
            (m, sum(r.count for r in rs), sum(r.bytes for r in rs), rs) for m, rs in grouped.items()
        ]

    def format(self, per: str = "module") -> str:
        """The summary as a text table.

        Args:
            per: ``"module"`` (one line per module, its arrays' shapes listed) or
                ``"param"`` (one line per array: path, shape, dtype, count, bytes).

        Returns:
            The table, lines joined by newlines (no trailing newline).
        """
        if per not in ("module", "param"):
            raise ValueError(f"per must be 'module' or 'param'; got {per!r}.")
        head: tuple[str, ...]
        body: list[tuple[str, ...]]
        if per == "param":
            head = ("path", "shape", "dtype", "params", "bytes")
            body = [
                (r.path, "x".join(map(str, r.shape)) or "scalar", r.dtype, f"{r.count:,}",
                 _human_bytes(r.bytes))
                for r in self.rows
            ]  # fmt: skip
        else:
            head = ("module", "params", "bytes", "arrays")
            body = [
                (
                    m or "(top level)",
                    f"{n:,}",
                    _human_bytes(b),
                    ", ".join(
                        f"{r.path.rpartition('/')[2]} {'x'.join(map(str, r.shape)) or 'scalar'}"
                        for r in rs
                    ),
                )
                for m, n, b, rs in self.modules()
            ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=False)]
        right = {"params", "bytes"}

        def line(cells: Sequence[str]) -> str:
            out = [
                str(c).rjust(w) if h in right else str(c).ljust(w)
                for c, w, h in zip(cells, widths, head, strict=True)
            ]
            return "  ".join(out).rstrip()

        lines = [f"model summary{': ' + self.name if self.name else ''}", line(head)]
        lines += [line(row) for row in body]
        dtypes = sorted({r.dtype for r in self.rows if r.trainable})
        total = (
            f"total: {self.total_params:,} parameters, {_human_bytes(self.total_bytes)} "
            f"({', '.join(dtypes) or 'no arrays'})"
        )
        if self.state_values:  # Keras' "non-trainable params"
            total += (
                f" + model state {self.state_values:,} values, {_human_bytes(self.state_bytes)}"
            )
        if self.flops_per_step is not None:
            total += (
                f"; {_human_flops(self.flops_per_step)} per train step "
                f"({(self.flops_source or 'unknown').split(':')[0]})"
            )
        lines.append(total)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the totals, the FLOPs and one dict per row."""
        return {
            "name": self.name,
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "state_values": self.state_values,
            "state_bytes": self.state_bytes,
            "flops_per_step": self.flops_per_step,
            "flops_source": self.flops_source,
            "params": [dataclasses.asdict(r) | {"shape": list(r.shape)} for r in self.rows],
        }


def model_summary(
    params: PyTree,
    step: Any = None,
    *step_args: Any,
    name: str = "",
    model_state: PyTree = None,
) -> ModelSummary:
    """Parameters per array and module, total bytes, and FLOPs of one train step.

    Args:
        params: the parameter pytree (e.g. ``state.params``); arrays or
            ``jax.ShapeDtypeStruct`` leaves (nothing is read from the device).
        step: optionally a compiled step (`jaxtrain.make_train_step`) or ``jax.jit``
            function; with ``step_args`` its FLOPs per call are counted by
            `jaxtrain.perf.step_flops` (lowered and compiled, never run: a donated
            state stays valid; fit's first call then reuses the compilation), and
            divided by the K steps a fused step's call runs.
        *step_args: the step's arguments, e.g. ``(state, batch)`` placed as in training.
        name: a title for `ModelSummary.format` (e.g. the model's name).
        model_state: optionally ``state.model_state`` (e.g. ``{"batch_stats": ...}``):
            listed after the parameters as non-trainable rows (paths starting with the
            collection) and totalled apart (``state_values``, ``state_bytes``).

    Returns:
        A `ModelSummary`.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"Dense_0": {"kernel": jnp.zeros((64, 32)), "bias": jnp.zeros(32)},
        ...           "Dense_1": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(10)}}
        >>> s = model_summary(params, name="MLP")
        >>> s.total_params, s.total_bytes  # (64*32 + 32 + 32*10 + 10), 4 bytes each
        (2410, 9640)
        >>> print(s.format())
        model summary: MLP
        module   params   bytes  arrays
        Dense_0   2,080  8.1 KB  bias 32, kernel 64x32
        Dense_1     330  1.3 KB  bias 10, kernel 32x10
        total: 2,410 parameters, 9.4 KB (float32)
    """
    rows = []
    for trainable, tree in ((True, params), (False, model_state or {})):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            shape = tuple(int(d) for d in np.shape(leaf))
            dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
            count = int(np.prod(shape, dtype=np.int64))
            rows.append(
                ParamRow(
                    "/".join(_key_name(k) for k in path) or "(root)",
                    shape,
                    dtype.name,
                    count,
                    count * dtype.itemsize,
                    trainable,
                )
            )
    params_rows = [r for r in rows if r.trainable]
    state_rows = [r for r in rows if not r.trainable]
    flops = source = None
    if step is not None:
        from jaxtrain import perf  # perf imports jax.monitoring: only when counting

        if not step_args:
            raise ValueError(
                "model_summary got a step but no arguments to count its FLOPs for. Fix: "
                "model_summary(state.params, train_step, state, batch)."
            )
        flops = perf.step_flops(step, *step_args)
        source = perf.step_flops_source(step)
        # A fused step (or a device epoch) runs K steps per call: the line says "per step".
        k = getattr(getattr(step, "spec", None), "steps_per_call", 1) or 1
        if flops is not None and k > 1:
            flops /= k
    return ModelSummary(
        rows=tuple(rows),
        total_params=sum(r.count for r in params_rows),
        total_bytes=sum(r.bytes for r in params_rows),
        flops_per_step=flops,
        flops_source=source,
        name=name,
        state_values=sum(r.count for r in state_rows),
        state_bytes=sum(r.bytes for r in state_rows),
    )
