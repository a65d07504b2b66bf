"""Step anatomy: what one compiled train step is made of.

PyTorch builds its computation graph while the forward pass runs (the autograd tape)
and throws it away after ``backward()``. JAX traces the function once into a *jaxpr*,
its computation graph as data, differentiates that graph (``jax.value_and_grad`` adds
the backward pass), and XLA compiles the whole step — forward, backward and update —
into one program. `step_anatomy` shows the forward jaxpr, counts the operations of the
whole step, and reports XLA's own estimate of the compiled step's FLOPs and bytes.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from jaxtrain.models.adapters import Model
from jaxtrain.state import TrainState
from jaxtrain.step import CompiledStep

MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
)


def normalize_cost_analysis(raw: Any) -> dict[str, float]:
    """``Compiled.cost_analysis()`` as one flat dict, whatever the JAX version returns.

    Older JAX versions return a list with one dict per compiled program, newer ones a
    dict, and some backends None.

    Args:
        raw: the return value of ``cost_analysis()``.

    Returns:
        ``{name: value}`` with numeric values only (summed over programs for a list);
        ``{}`` when XLA reported nothing. Keys include ``"flops"`` and
        ``"bytes accessed"`` where the backend provides them.
    """
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        entries = [raw]
    elif isinstance(raw, (list, tuple)):
        entries = [e for e in raw if isinstance(e, Mapping)]
    else:
        raise TypeError(
            f"cost_analysis() returned {type(raw).__name__}; expected a dict, a list of "
            "dicts or None."
        )
    out: dict[str, float] = {}
    for entry in entries:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0.0) + float(v)
    return out


def normalize_memory_analysis(raw: Any) -> dict[str, int]:
    """``Compiled.memory_analysis()`` as a dict of byte counts (``{}`` when unavailable).

    Args:
        raw: None, an object with ``*_size_in_bytes`` attributes, a dict of them, or a
            list of either (the first entry is used).

    Returns:
        ``{field: bytes}`` for the fields of `MEMORY_FIELDS` that are present.
    """
    if raw is None:
        return {}
    if isinstance(raw, (list, tuple)):
        return normalize_memory_analysis(raw[0]) if raw else {}
    if isinstance(raw, Mapping):
        return {k: int(raw[k]) for k in MEMORY_FIELDS if k in raw}
    return {k: int(getattr(raw, k)) for k in MEMORY_FIELDS if hasattr(raw, k)}


@dataclasses.dataclass(frozen=True)
class StepAnatomy:
    """What a compiled step is made of.

    Attributes:
        forward_jaxpr: the forward pass's jaxpr as text (None without a model).
        step_primitives: primitive name -> count over the whole step's jaxpr (forward,
            backward, optimizer update).
        flops: XLA's FLOP estimate for one step (None when the backend gives none).
        bytes_accessed: XLA's estimate of bytes read and written (None likewise).
        memory: byte counts of the compiled step (arguments, outputs, temporaries,
            aliased i.e. donated, generated code); empty when unavailable.
        cost: every number ``cost_analysis()`` reported.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxtrain as jt
        >>> opt = optax.sgd(0.1)
        >>> step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = jt.TrainState.create({"w": jnp.ones(3)}, opt, jax.random.key(0))
        >>> anatomy = step_anatomy(step, state, {"x": jnp.ones((4, 3))})
        >>> anatomy.forward_jaxpr is None, anatomy.step_primitives["dot_general"] >= 2
        (True, True)
        >>> anatomy.report().splitlines()[0].startswith("whole step:")
        True
    """

    forward_jaxpr: str | None
    step_primitives: dict[str, int]
    flops: float | None
    bytes_accessed: float | None
    memory: dict[str, int]
    cost: dict[str, float]

    def report(self) -> str:
        """A short human-readable summary."""
        lines = []
        n = sum(self.step_primitives.values())
        top = ", ".join(f"{k} x{v}" for k, v in list(self.step_primitives.items())[:8])
        lines.append(f"whole step: {n} operations in its jaxpr ({top}, ...)")
        lines.append("FLOPs per step: " + ("n/a" if self.flops is None else f"{self.flops:,.0f}"))
        lines.append(
            "bytes accessed per step: "
            + ("n/a" if self.bytes_accessed is None else f"{self.bytes_accessed:,.0f}")
        )
        for k, v in self.memory.items():
            lines.append(f"{k.replace('_in_bytes', '').replace('_', ' ')}: {v:,} bytes")
        return "\n".join(lines)


def _count_primitives(jaxpr: Any) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for p in eqn.params.values():  # pjit, custom_jvp, cond branches, scan bodies ...
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    counts.update(_count_primitives(sub))
    return counts


def step_anatomy(
    train_step: CompiledStep,
    state: TrainState,
    batch: Mapping[str, Any],
    model: Model | None = None,
) -> StepAnatomy:
    """Dissects a compiled train step on one ``(state, batch)``.

    Nothing runs on the device and the state is not donated: the step is only traced,
    lowered and compiled. The trace counts in ``train_step.trace_count`` as usual; JAX
    caches it, so a later call with the same shapes does not trace again.

    Args:
        train_step: from `jaxtrain.make_train_step` (with ``jit=True``).
        state: a `TrainState` of the shapes the step will see.
        batch: a batch ``{"x": [B, ...], ...}`` of those shapes.
        model: the `Model` inside the loss, to show its forward pass
            ``model.apply(params, model_state, batch["x"])`` as a jaxpr.

    Returns:
        A `StepAnatomy`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxtrain as jt
        >>> model = jt.from_function(lambda p, x: x @ p["w"])  # logits [B, 2]
        >>> opt = optax.sgd(0.1)
        >>> state = jt.TrainState.create({"w": jnp.zeros((3, 2))}, opt, jax.random.key(0))
        >>> from jaxtrain.apps.tasks import classification_loss
        >>> step = jt.make_train_step(classification_loss(model), opt)
        >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.array([0, 1, 0, 1])}
        >>> anatomy = step_anatomy(step, state, batch, model)
        >>> "dot_general" in anatomy.forward_jaxpr, step.trace_count
        (True, 1)
    """
    if train_step.jitted is train_step.fn:
        raise ValueError(
            "step_anatomy needs a compiled step; this one was built with jit=False. "
            "Fix: make_train_step(..., jit=True) (the default)."
        )
    forward = None
    if model is not None:

        def fwd(params, x):
            return model.apply(params, state.model_state, x)[0]

        forward = str(jax.make_jaxpr(fwd)(state.params, batch["x"]))
    step_jaxpr = jax.make_jaxpr(train_step.fn)(state, batch)
    compiled = train_step.lower(state, batch).compile()
    primitives = dict(_count_primitives(step_jaxpr.jaxpr).most_common())
    cost = normalize_cost_analysis(compiled.cost_analysis())
    try:
        memory = normalize_memory_analysis(compiled.memory_analysis())
    except (NotImplementedError, AttributeError):  # not every backend implements it
        memory = {}
    return StepAnatomy(
        forward_jaxpr=forward,
        step_primitives=primitives,
        flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"),
        memory=memory,
        cost=cost,
    )
