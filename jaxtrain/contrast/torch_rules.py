"""PyTorch's update rules where no optax setting reproduces them, as optax transformations.

Each is the arithmetic of the ``torch.optim`` single-tensor loop (``foreach=False``),
step by step, so that in float64 both frameworks agree to rounding (~1e-16 per step):

* `sgd_momentum_torch`: ``SGD(momentum=m, dampening=d)``: the first step's buffer is the
  gradient itself (``buf = g``, *not* dampened); afterwards ``buf = m * buf + (1 - d) * g``.
  ``optax.trace`` has no dampening.
* `scale_by_adam_torch`: ``Adam``/``AdamW`` including ``amsgrad=True``: PyTorch keeps the
  running maximum of the *raw* second moment ``v`` and bias-corrects it afterwards
  (``sqrt(max v) / sqrt(1 - b2**t)``); ``optax.amsgrad`` keeps the maximum of the
  *bias-corrected* ``v_hat``. Since ``1 - b2**t`` grows with ``t``, the two maxima differ
  once an older ``v`` wins (see the amsgrad test).
* `scale_by_rss_torch`: ``Adagrad``: ``g / (sqrt(sum g^2) + eps)``; ``optax.scale_by_rss``
  puts eps inside the square root (``g / sqrt(sum g^2 + eps)``) and starts the sum at 0.1.

None of them applies the learning rate: chain ``optax.scale_by_learning_rate`` after.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TraceTorchState(NamedTuple):
    """`sgd_momentum_torch`'s state: the momentum buffer and the steps taken."""

    steps: jax.Array  # int32 scalar
    buf: Any  # the parameters' tree


def sgd_momentum_torch(
    momentum: Any, dampening: float = 0.0, nesterov: bool = False
) -> optax.GradientTransformation:
    """``torch.optim.SGD``'s momentum buffer, dampening and Nesterov, exactly.

    Args:
        momentum: PyTorch's ``momentum`` (a float or a traced scalar, e.g. cycled by
            ``OneCycleLR``).
        dampening: PyTorch's ``dampening`` (not applied on the first step, as in PyTorch).
        nesterov: PyTorch's ``nesterov`` (needs ``dampening == 0`` there).

    Returns:
        A transformation mapping gradients to ``buf`` (or ``g + m * buf`` with Nesterov).

    Example:
        >>> import jax.numpy as jnp
        >>> tx = sgd_momentum_torch(0.9, dampening=0.5)
        >>> g = {"w": jnp.ones(1)}
        >>> u1, s = tx.update(g, tx.init(g))  # first step: buf = g
        >>> u2, s = tx.update(g, s)  # then 0.9 * 1 + (1 - 0.5) * 1
        >>> round(float(u1["w"][0]), 6), round(float(u2["w"][0]), 6)
        (1.0, 1.4)
    """

    def init_fn(params):
        return TraceTorchState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        first = state.steps == 0
        buf = jax.tree.map(
            lambda g, b: jnp.where(first, g, momentum * b + (1 - dampening) * g),
            updates,
            state.buf,
        )
        out = jax.tree.map(lambda g, b: g + momentum * b, updates, buf) if nesterov else buf
        return out, TraceTorchState(optax.safe_increment(state.steps), buf)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamTorchState(NamedTuple):
    """`scale_by_adam_torch`'s state: step count, moments, max of the raw second moment."""

    steps: jax.Array  # int32 scalar
    mu: Any
    nu: Any
    nu_max: Any  # PyTorch's max_exp_avg_sq (zeros, unused without amsgrad)


def scale_by_adam_torch(
    b1: Any = 0.9, b2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False
) -> optax.GradientTransformation:
    """``torch.optim.Adam``'s direction ``m_hat / (sqrt(v) / sqrt(1 - b2**t) + eps)``.

    With ``amsgrad=True`` ``v`` is the running maximum of the *raw* second moment (as
    PyTorch); ``optax.scale_by_amsgrad`` takes the maximum of the bias-corrected one.

    Args:
        b1: ``betas[0]`` (a float or a traced scalar, e.g. cycled by ``OneCycleLR``; the
            bias correction uses the current value, as PyTorch's ``1 - beta1 ** step``).
        b2: ``betas[1]``.
        eps: added to the bias-corrected ``sqrt(v)``.
        amsgrad: PyTorch's ``amsgrad``.

    Returns:
        A transformation; chain ``optax.scale_by_learning_rate`` after it.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adam_torch(amsgrad=True)
        >>> g = {"w": jnp.array([2.0])}
        >>> u, _ = tx.update(g, tx.init(g))
        >>> round(float(u["w"][0]), 6)  # first step: g / (|g| + eps)
        1.0
    """

    def init_fn(params):
        # three separate buffers: a train step donates the state, and one buffer in
        # three leaves would be donated three times
        mu, nu, nu_max = (jax.tree.map(jnp.zeros_like, params) for _ in range(3))
        return ScaleByAdamTorchState(jnp.zeros([], jnp.int32), mu, nu, nu_max)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.steps)
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)  # lerp_
        nu = jax.tree.map(lambda v, g: v * b2 + g * g * (1 - b2), state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else state.nu_max
        second = nu_max if amsgrad else nu

        def direction(m, v):
            t = count.astype(m.dtype)
            bc1 = _one_minus_power(b1, t)
            bc2_sqrt = jnp.sqrt(_one_minus_power(b2, t))
            return m / (jnp.sqrt(v) / bc2_sqrt + eps) / bc1

        out = jax.tree.map(direction, mu, second)
        return out, ScaleByAdamTorchState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def _one_minus_power(b: Any, t: jax.Array) -> jax.Array:
    """``1 - b**t`` as ``-expm1(t * log(b))``, ``log(b)`` in Python's float64 for a float.

    PyTorch computes its bias corrections in Python floats (float64) even for float32
    parameters; ``1 - 0.999**t`` in float32 is off by up to 5e-5 relative (0.999 itself
    rounds), this form by ~1e-7.
    """
    if isinstance(b, (int, float)):
        if b == 0:
            return jnp.ones_like(t)
        return -jnp.expm1(t * jnp.asarray(math.log(b), t.dtype))
    return -jnp.expm1(t * jnp.log(jnp.asarray(b, t.dtype)))


def scale_by_rss_torch(
    initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> optax.GradientTransformation:
    """``torch.optim.Adagrad``'s direction ``g / (sqrt(sum of g^2) + eps)``.

    Args:
        initial_accumulator_value: the start of the sum (PyTorch 0; optax's default 0.1).
        eps: added *outside* the square root (PyTorch 1e-10; optax's 1e-7 is inside).

    Returns:
        A transformation; chain ``optax.scale_by_learning_rate`` after it.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_rss_torch()
        >>> g = {"w": jnp.array([3.0])}
        >>> u, _ = tx.update(g, tx.init(g))
        >>> round(float(u["w"][0]), 6)  # 3 / sqrt(9)
        1.0
    """

    def init_fn(params):
        return jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params)

    def update_fn(updates, state, params=None):
        del params
        total = jax.tree.map(lambda s, g: s + g * g, state, updates)
        out = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, total)
        return out, total

    return optax.GradientTransformation(init_fn, update_fn)
