"""PyTorch's layers as pure JAX functions, in PyTorch's layout and with PyTorch's numerics.

Every function here takes arrays laid out as PyTorch lays them out (``[N, C, H, W]``,
``[N, C, L]``, weights ``[out, in]`` and OIHW) and computes what the PyTorch layer computes:
two-pass variances, the unbiased running variance of BatchNorm, ``count_include_pad`` of
average pooling, the zero gradient of an ``Embedding``'s ``padding_idx`` row. They are the
building blocks of both conversions: `jaxtrain.contrast.fx` calls them directly, and the
``nn.Sequential`` conversion (`jaxtrain.contrast.convert`) calls them on the layers Flax
has no exact twin for.

Shapes: ``N`` batch, ``C`` channels, ``G`` groups, ``*S`` spatial dimensions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


# ---------------------------------------------------------------------------- activations


def softplus(x: Array, beta: float = 1.0, threshold: float = 20.0) -> Array:
    """PyTorch's ``Softplus``: ``log(1 + exp(beta x)) / beta``, linear where ``beta x > threshold``.

    Args:
        x: any shape, elementwise.
        beta: PyTorch's ``beta`` (sharpness; 1 by default).
        threshold: PyTorch's ``threshold``: where ``beta * x`` exceeds it the output is
            ``x`` itself (avoids overflow of ``exp``).

    Returns:
        The shape and dtype of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> softplus(jnp.array([0.0, 30.0])).tolist()  # log 2; linear above the threshold
        [0.6931471824645996, 30.0]
    """
    bx = beta * x
    return jnp.where(bx > threshold, x, jax.nn.softplus(bx) / beta)


def _dim(x: Array, dim: int | None, name: str) -> int:
    if dim is None:
        raise ValueError(
            f"{name}(dim=None) picks its axis by a deprecated rule (PyTorch warns). "
            f"Fix: give dim explicitly, e.g. nn.{name}(dim=-1)."
        )
    return dim


# kind -> f(x, **settings); the settings are the PyTorch layer's own keyword names.
ACTIVATIONS: dict[str, Callable[..., Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # nn.GELU() is exact (erf)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x, negative_slope=0.01: jax.nn.leaky_relu(x, negative_slope),
    "elu": lambda x, alpha=1.0: jax.nn.elu(x, alpha),
    "softplus": softplus,
    "softmax": lambda x, dim=None: jax.nn.softmax(x, axis=_dim(x, dim, "Softmax")),
    "log_softmax": lambda x, dim=None: jax.nn.log_softmax(x, axis=_dim(x, dim, "LogSoftmax")),
    "identity": lambda x: x,
}


# ---------------------------------------------------------------------------- linear, conv


def linear(x: Array, weight: Array, bias: Array | None) -> Array:
    """``nn.Linear``: ``x [..., in] @ weight.T [in, out] + bias [out]`` -> ``[..., out]``.

    Args:
        x: ``[..., in]``: features on the last axis, any leading axes.
        weight: ``[out, in]``, PyTorch's layout (the transpose of Flax's ``Dense`` kernel).
        bias: ``[out]``, or None (``bias=False``).

    Returns:
        ``[..., out]``, the leading axes of ``x`` kept.

    Example:
        >>> import jax.numpy as jnp
        >>> linear(jnp.ones((2, 5, 3)), jnp.ones((4, 3)), jnp.zeros(4)).shape  # [B, T, F]
        (2, 5, 4)
    """
    y = jnp.matmul(x, weight.T)
    return y if bias is None else y + bias


def conv(
    x: Array,
    weight: Array,
    bias: Array | None,
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    groups: int,
) -> Array:
    """``nn.Conv1d/2d`` (zero padding): ``x [N, C, *S]``, ``weight [O, C / groups, *K]``.

    Args:
        x: ``[N, C, *S]``, channels first (NCL, NCHW) as in PyTorch.
        weight: ``[O, C / groups, *K]``, PyTorch's layout (OIL, OIHW).
        bias: ``[O]``, or None (``bias=False``).
        stride: one step per spatial axis, e.g. ``(2, 2)``.
        padding: one ``(before, after)`` pair of zeros per spatial axis, e.g.
            ``[(1, 1), (1, 1)]`` for PyTorch's ``padding=1``. PyTorch's ``padding="same"``
            is ``(t // 2, t - t // 2)`` with ``t = dilation * (K - 1)``: the extra zero of
            an even kernel goes after.
        dilation: one kernel dilation per spatial axis (1: none).
        groups: PyTorch's ``groups``; ``C`` and ``O`` are multiples of it.

    Returns:
        ``[N, O, *S']`` with, per spatial axis,
        ``S' = (S + before + after - dilation * (K - 1) - 1) // stride + 1``.

    Example:
        >>> import jax.numpy as jnp
        >>> x, w = jnp.ones((1, 2, 5)), jnp.ones((3, 2, 3))  # Conv1d(2, 3, 3, padding=1)
        >>> conv(x, w, None, (1,), [(1, 1)], (1,), 1)[0, 0].tolist()
        [4.0, 6.0, 6.0, 6.0, 4.0]
    """
    spatial = "HWD"[: x.ndim - 2]
    dims = ("NC" + spatial, "OI" + spatial, "NC" + spatial)
    y = lax.conv_general_dilated(
        x,
        weight,
        window_strides=tuple(stride),
        padding=[(int(lo), int(hi)) for lo, hi in padding],
        rhs_dilation=tuple(dilation),
        feature_group_count=groups,
        dimension_numbers=dims,
    )
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * (x.ndim - 2))
    return y


# ---------------------------------------------------------------------------- pooling


def _window(x: Array, k: Sequence[int]) -> tuple[int, ...]:
    return (1, 1, *k) if len(k) == x.ndim - 2 else tuple(k)


def max_pool(
    x: Array, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> Array:
    """``nn.MaxPool1d/2d`` (floor mode, no dilation) on ``[N, C, *S]``; pads with -inf.

    Args:
        x: ``[N, C, *S]``, channels first (NCL, NCHW) as in PyTorch.
        kernel: the window, one size per spatial axis, e.g. ``(2, 2)``.
        stride: one step per spatial axis; PyTorch's ``stride=None`` is ``kernel``.
        padding: ``-inf`` values added on both sides, one count per spatial axis.

    Returns:
        ``[N, C, *S']``, ``S' = (S + 2 * padding - kernel) // stride + 1`` per axis.

    Example:
        >>> import jax.numpy as jnp
        >>> max_pool(jnp.arange(16.0).reshape(1, 1, 4, 4), (2, 2), (2, 2), (0, 0))[0, 0].tolist()
        [[5.0, 7.0], [13.0, 15.0]]
    """
    pads = ((0, 0), (0, 0), *((p, p) for p in padding))
    init = jnp.array(-jnp.inf, x.dtype)
    return lax.reduce_window(x, init, lax.max, _window(x, kernel), _window(x, stride), pads)


def avg_pool(
    x: Array,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    count_include_pad: bool = True,
) -> Array:
    """``nn.AvgPool1d/2d`` (floor mode) on ``[N, C, *S]``.

    ``count_include_pad=True`` (PyTorch's default) divides every window by its full size,
    zero padding included; False divides by the number of real elements.

    Args:
        x: ``[N, C, *S]``, channels first (NCL, NCHW) as in PyTorch.
        kernel: the window, one size per spatial axis, e.g. ``(2, 2)``.
        stride: one step per spatial axis; PyTorch's ``stride=None`` is ``kernel``.
        padding: zeros added on both sides, one count per spatial axis.
        count_include_pad: PyTorch's ``count_include_pad`` (see above).

    Returns:
        ``[N, C, *S']``, ``S' = (S + 2 * padding - kernel) // stride + 1`` per axis.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 1, 2, 2))
        >>> avg_pool(x, (2, 2), (2, 2), (1, 1))[0, 0].tolist()  # 1 real value of 4
        [[0.25, 0.25], [0.25, 0.25]]
        >>> avg_pool(x, (2, 2), (2, 2), (1, 1), count_include_pad=False)[0, 0].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    pads = ((0, 0), (0, 0), *((p, p) for p in padding))
    zero = jnp.array(0, x.dtype)
    win, strides = _window(x, kernel), _window(x, stride)
    total = lax.reduce_window(x, zero, lax.add, win, strides, pads)
    if count_include_pad or not any(padding):
        size = 1
        for k in kernel:
            size *= int(k)
        return total / size
    counts = lax.reduce_window(jnp.ones_like(x), zero, lax.add, win, strides, pads)
    return total / counts


def adaptive_output_size(
    spatial: Sequence[int], output_size: int | Sequence[int | None]
) -> tuple[int, ...]:
    """PyTorch's ``output_size`` (an int, or a tuple with None for "keep") as a tuple.

    Args:
        spatial: the input's spatial sizes ``S`` (``x.shape[2:]`` of ``[N, C, *S]``).
        output_size: ``nn.AdaptiveAvgPool1d/2d``'s ``output_size``: an int for every
            spatial axis, or one entry per spatial axis, None keeping that axis's size.

    Returns:
        One output size per spatial axis, for `adaptive_avg_pool`.

    Example:
        >>> adaptive_output_size((8, 6), 1), adaptive_output_size((8, 6), (None, 3))
        ((1, 1), (8, 3))
    """
    if isinstance(output_size, int):
        return (output_size,) * len(spatial)
    return tuple(s if o is None else int(o) for s, o in zip(spatial, output_size, strict=True))


def adaptive_avg_pool(x: Array, output_size: Sequence[int]) -> Array:
    """``nn.AdaptiveAvgPool1d/2d`` on ``[N, C, *S]`` when every ``S`` is a multiple of the output.

    Then PyTorch's windows are disjoint and of equal size ``S / out``: a plain average pool.

    Args:
        x: ``[N, C, *S]``, channels first (NCL, NCHW) as in PyTorch.
        output_size: one output size per spatial axis, each dividing its ``S`` (see
            `adaptive_output_size` for PyTorch's int / None forms).

    Returns:
        ``[N, C, *output_size]``: each value the mean of its ``S / out`` window.

    Raises:
        ValueError: a spatial size that is not a multiple of its output size (PyTorch's
            windows then overlap and differ in size).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(8.0).reshape(1, 1, 2, 4)
        >>> adaptive_avg_pool(x, (1, 2))[0, 0].tolist()  # windows of 2x2
        [[2.5, 4.5]]
    """
    spatial = x.shape[2:]
    out = tuple(output_size)
    if any(s % o for s, o in zip(spatial, out, strict=True)):
        raise ValueError(
            f"AdaptiveAvgPool to output size {list(out)} from spatial size {list(spatial)}: "
            "a size that does not divide the input gives windows of different sizes, which "
            "are not converted. Fix: pool to a divisor of the input size (1 always works), "
            "or resize the input."
        )
    shape = [x.shape[0], x.shape[1]]
    for s, o in zip(spatial, out, strict=True):
        shape += [o, s // o]
    axes = tuple(3 + 2 * i for i in range(len(out)))
    return x.reshape(shape).mean(axis=axes)


# ---------------------------------------------------------------------------- normalisation


def _stats(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Mean and biased variance over ``axes``, two-pass (as PyTorch computes them)."""
    mean = x.mean(axis=axes, keepdims=True)
    var = jnp.square(x - mean).mean(axis=axes, keepdims=True)
    return mean, var


def batch_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    stats: dict[str, Array] | None,
    *,
    train: bool,
    momentum: float | None,
    eps: float,
    channel_axis: int = 1,
) -> tuple[Array, dict[str, Array] | None]:
    """``nn.BatchNorm1d/2d``: normalise per channel; in training, update the running stats.

    Training normalises with the batch mean and *biased* variance, and updates
    ``running_mean = (1 - m) * running_mean + m * mean`` and
    ``running_var = (1 - m) * running_var + m * var * n / (n - 1)`` — PyTorch keeps the
    *unbiased* variance (``n`` values per channel). ``m`` is PyTorch's ``momentum``
    (0.1 by default, Flax's ``momentum=0.9`` is the same decay), or, for
    ``momentum=None``, ``1 / num_batches_tracked`` (a cumulative average). Evaluation
    normalises with the running statistics.

    Args:
        x: ``[N, C, *S]`` (or channels at ``channel_axis``).
        weight: ``[C]`` scale, or None (``affine=False``).
        bias: ``[C]`` shift, or None (``affine=False``).
        stats: ``{"running_mean": [C], "running_var": [C], "num_batches_tracked": []}``,
            or None (``track_running_stats=False``: always the batch statistics).
        train: PyTorch's ``model.train()`` (True) or ``model.eval()`` (False).
        momentum: PyTorch's ``momentum`` (None: cumulative average).
        eps: added to the variance.
        channel_axis: the channel axis of ``x``.

    Returns:
        ``(y, new_stats)``; ``new_stats`` is ``stats`` itself outside training.

    Raises:
        ValueError: training with one value per channel (PyTorch raises too).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0], [3.0]])  # [N=2, C=1]
        >>> stats = {"running_mean": jnp.zeros(1), "running_var": jnp.ones(1),
        ...          "num_batches_tracked": jnp.array(0)}
        >>> y, new = batch_norm(x, None, None, stats, train=True, momentum=0.1, eps=0.0)
        >>> y.ravel().tolist(), new["running_var"].tolist()  # unbiased var 2: 0.9 + 0.1 * 2
        ([-1.0, 1.0], [1.100000023841858])
    """
    axis = channel_axis % x.ndim
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    if train or stats is None:
        mean, var = _stats(x, axes)
    else:
        mean = stats["running_mean"].reshape(shape)
        var = stats["running_var"].reshape(shape)
    y = (x - mean) * lax.rsqrt(var + jnp.asarray(eps, x.dtype))
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    if not train or stats is None:
        return y, stats
    n = x.size // x.shape[axis]
    if n <= 1:
        raise ValueError(
            f"BatchNorm in training got {n} value per channel (input shape {list(x.shape)}); "
            "its variance is undefined (PyTorch raises too). Fix: train with batches of "
            "more than one example, or use train=False."
        )
    count = stats["num_batches_tracked"] + 1
    m = (1.0 / count).astype(x.dtype) if momentum is None else jnp.asarray(momentum, x.dtype)
    unbiased = var.reshape(-1) * (n / (n - 1))
    new = {
        "running_mean": (1 - m) * stats["running_mean"] + m * mean.reshape(-1),
        "running_var": (1 - m) * stats["running_var"] + m * unbiased,
        "num_batches_tracked": count,
    }
    return y, new


def group_norm(
    x: Array, num_groups: int, weight: Array | None, bias: Array | None, eps: float
) -> Array:
    """``nn.GroupNorm`` on ``[N, C, *S]``: normalise each of ``G`` channel groups per example.

    Each group is ``C / G`` consecutive channels; its mean and biased variance are taken
    over those channels and all of ``S``, per example. The affine part is per channel.

    Args:
        x: ``[N, C, *S]``, channels first (NC, NCL, NCHW) as in PyTorch.
        num_groups: ``G``, PyTorch's ``num_groups``; divides ``C``.
        weight: ``[C]`` scale, or None (``affine=False``).
        bias: ``[C]`` shift, or None (``affine=False``).
        eps: added to the variance.

    Returns:
        The shape and dtype of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[[1.0], [3.0], [5.0], [9.0]]])  # [N=1, C=4, L=1], 2 groups
        >>> group_norm(x, 2, None, None, 0.0).ravel().tolist()  # each group on its own
        [-1.0, 1.0, -1.0, 1.0]
    """
    n, c = x.shape[:2]
    xg = x.reshape(n, num_groups, -1)
    mean, var = _stats(xg, (2,))
    y = ((xg - mean) * lax.rsqrt(var + jnp.asarray(eps, x.dtype))).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def layer_norm(x: Array, ndims: int, weight: Array | None, bias: Array | None, eps: float) -> Array:
    """``nn.LayerNorm`` over the last ``ndims`` axes (its ``normalized_shape``), two-pass.

    Args:
        x: ``[..., *D]`` with ``D`` the ``ndims`` normalised axes (e.g. ``[B, T, F]``).
        ndims: ``len(normalized_shape)``: how many trailing axes share one mean and
            biased variance.
        weight: ``[*D]`` (``normalized_shape``) elementwise scale, or None
            (``elementwise_affine=False``).
        bias: ``[*D]`` elementwise shift, or None (``elementwise_affine=False`` or
            ``bias=False``).
        eps: added to the variance.

    Returns:
        The shape and dtype of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> layer_norm(jnp.array([[1.0, 3.0]]), 1, None, None, 0.0).tolist()
        [[-1.0, 1.0]]
    """
    mean, var = _stats(x, tuple(range(x.ndim - ndims, x.ndim)))
    y = (x - mean) * lax.rsqrt(var + jnp.asarray(eps, x.dtype))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# ---------------------------------------------------------------------------- the rest


def embedding(ids: Array, weight: Array, padding_idx: int | None) -> Array:
    """``nn.Embedding``: rows of ``weight [V, D]`` for ``ids [...]`` -> ``[..., D]``.

    The ``padding_idx`` row gets no gradient, as in PyTorch (its value is still looked up).

    Args:
        ids: ``[...]`` integer indices in ``[0, V)``. Unlike PyTorch, nothing is checked
            (an index cannot raise under ``jit``): ids of ``V`` or more give NaN rows, and
            negative ids count from the end.
        weight: ``[V, D]``, the table (PyTorch's and Flax's ``Embed`` layout alike).
        padding_idx: the row that gets no gradient, as stored by ``nn.Embedding``
            (non-negative), or None.

    Returns:
        ``[..., D]``: the ``weight`` row of each id, in ``weight``'s dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> ids, table = jnp.array([[0, 2]]), jnp.ones((3, 2))
        >>> grad = jax.grad(lambda w: embedding(ids, w, padding_idx=0).sum())(table)
        >>> grad.tolist()  # row 0 (padding) gets none, row 2 gets 1 per use
        [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """
    rows = jnp.take(weight, ids, axis=0)
    if padding_idx is None:
        return rows
    pad = (ids == padding_idx)[..., None]
    return jnp.where(pad, lax.stop_gradient(rows), rows)


def dropout(x: Array, p: float, *, train: bool, rng: Any, where: str = "Dropout") -> Array:
    """``nn.Dropout``: in training, zero each element with probability ``p``, scale by ``1/(1-p)``.

    The mask comes from JAX's ``rng``, so it differs from PyTorch's (different generators):
    outputs agree in expectation, and exactly with ``p=0`` or outside training.

    Args:
        x: any shape; each element is dropped on its own.
        p: the probability of zeroing an element, in ``[0, 1]`` (1: all zeros).
        train: PyTorch's ``model.train()`` (True) or ``model.eval()`` (False: ``x`` as is).
        rng: a ``jax.random`` key for the mask; may be None outside training or with
            ``p=0``.
        where: the layer named in the error message (e.g. ``"Dropout 'encoder.drop'"``).

    Returns:
        The shape and dtype of ``x``.

    Raises:
        ValueError: training with ``p > 0`` and no ``rng``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.ones(8)
        >>> bool((dropout(x, 0.5, train=False, rng=None) == x).all())  # model.eval()
        True
        >>> y = dropout(x, 0.5, train=True, rng=jax.random.key(0))
        >>> sorted(set(y.tolist())) in ([0.0, 2.0], [0.0], [2.0])  # kept ones scaled by 2
        True
    """
    if not train or p == 0:
        return x
    if rng is None:
        raise ValueError(
            f"{where}(p={p}) in training needs a random key, but rng=None. Fix: pass "
            "rng= (jaxtrain's train step passes fold_in(state.rng, step) to the model)."
        )
    if p >= 1:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(rng, 1.0 - p, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros((), x.dtype))
