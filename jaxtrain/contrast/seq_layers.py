"""The ``nn.Sequential`` conversion's layers beyond Linear/Conv2d/LayerNorm/MaxPool2d.

Each PyTorch layer type has a converter (``convert_*``: checks the settings, appends a
spec and plans the weights) and a spec whose ``build(module, x, train)`` runs inside the
converted `jaxtrain.contrast.convert.Sequential`. Layouts: 4-D activations are NHWC on the
Flax side (``[B, H, W, C]``); 2-D and 3-D ones keep PyTorch's layout (``[B, F]``,
``[B, C, L]`` for ``Conv1d``/``BatchNorm1d``, ``[B, T, F]`` for ``Linear``/``LayerNorm``), so
a layer that needs PyTorch's layout on a 4-D activation transposes around
`jaxtrain.contrast.torch_ops`.

Flax names and parameter layouts (what ``converted.params`` holds):

=================  ==================  =================================================
PyTorch            Flax name           parameters / ``model_state["batch_stats"]``
=================  ==================  =================================================
``BatchNorm1d/2d`` ``BatchNorm_i``     ``scale``, ``bias``; stats ``mean``, ``var``,
                                       ``num_batches_tracked`` (PyTorch's buffers)
``GroupNorm``      ``GroupNorm_i``     ``scale``, ``bias``
``Conv1d``         ``Conv_i``          ``kernel [K, I, O]`` (PyTorch ``[O, I, K]``)
``Embedding``      ``Embed_i``         ``embedding [V, D]`` (PyTorch ``weight``, same)
=================  ==================  =================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxtrain.contrast import torch_ops as ops

# ---------------------------------------------------------------------------- Flax modules


def _torch_layout(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``f`` (written for PyTorch's NCHW) applied to an NHWC activation; 2-D/3-D as they are."""
    if x.ndim != 4:
        return f(x)
    return jnp.transpose(f(jnp.transpose(x, (0, 3, 1, 2))), (0, 2, 3, 1))


class BatchNorm(nn.Module):
    """PyTorch's ``BatchNorm1d/2d`` (`jaxtrain.contrast.torch_ops.batch_norm`) in Flax.

    Unlike ``flax.linen.BatchNorm``, the running variance is PyTorch's unbiased one.

    Attributes:
        momentum: PyTorch's momentum (0.1 by default; None: cumulative average).
        eps: added to the variance.
        affine: learn ``scale`` and ``bias``.
        track_running_stats: keep ``mean``/``var`` in the ``batch_stats`` collection.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> bn = BatchNorm(momentum=0.1, eps=1e-5, affine=True, track_running_stats=True)
        >>> x = jnp.array([[1.0], [3.0]])  # [B=2, C=1]
        >>> variables = bn.init(jax.random.key(0), x, train=False)
        >>> y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> round(float(upd["batch_stats"]["var"][0]), 6)  # 0.9 * 1 + 0.1 * unbiased var 2
        1.1
    """

    momentum: float | None
    eps: float
    affine: bool
    track_running_stats: bool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``x``: ``[B, H, W, C]`` (NHWC), ``[B, C, L]`` or ``[B, C]`` -> same shape."""
        axis = -1 if x.ndim == 4 else 1
        c = x.shape[axis]
        weight = bias = None
        if self.affine:
            weight = self.param("scale", nn.initializers.ones, (c,))
            bias = self.param("bias", nn.initializers.zeros, (c,))
        stats = None
        if self.track_running_stats:
            mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
            var = self.variable("batch_stats", "var", jnp.ones, (c,))
            count = self.variable(
                "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
            )
            stats = {
                "running_mean": mean.value,
                "running_var": var.value,
                "num_batches_tracked": count.value,
            }
        y, new = ops.batch_norm(
            x,
            weight,
            bias,
            stats,
            train=train,
            momentum=self.momentum,
            eps=self.eps,
            channel_axis=axis,
        )
        if train and new is not None and not self.is_initializing():
            mean.value, var.value = new["running_mean"], new["running_var"]
            count.value = new["num_batches_tracked"]
        return y


class GroupNorm(nn.Module):
    """PyTorch's ``GroupNorm`` (`jaxtrain.contrast.torch_ops.group_norm`) in Flax."""

    num_groups: int
    eps: float
    affine: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[B, H, W, C]`` (NHWC) or ``[B, C, ...]`` -> same shape."""
        c = x.shape[-1] if x.ndim == 4 else x.shape[1]
        weight = bias = None
        if self.affine:
            weight = self.param("scale", nn.initializers.ones, (c,))
            bias = self.param("bias", nn.initializers.zeros, (c,))
        return _torch_layout(
            lambda t: ops.group_norm(t, self.num_groups, weight, bias, self.eps), x
        )


class Embed(nn.Module):
    """PyTorch's ``Embedding`` in Flax (``padding_idx``'s row gets no gradient)."""

    num_embeddings: int
    features: int
    padding_idx: int | None

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids [B, T]`` integers -> ``[B, T, D]``."""
        table = self.param(
            "embedding", nn.initializers.normal(1.0), (self.num_embeddings, self.features)
        )
        return ops.embedding(ids, table, self.padding_idx)


# ---------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class BatchNormSpec:
    momentum: float | None
    eps: float
    affine: bool
    track_running_stats: bool

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        bn = BatchNorm(self.momentum, self.eps, self.affine, self.track_running_stats)
        return bn(x, train)


@dataclasses.dataclass(frozen=True)
class GroupNormSpec:
    num_groups: int
    eps: float
    affine: bool

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        return GroupNorm(self.num_groups, self.eps, self.affine)(x)


@dataclasses.dataclass(frozen=True)
class Conv1dSpec:
    features: int
    kernel_size: int
    stride: int
    padding: tuple[int, int]
    dilation: int
    groups: int
    use_bias: bool

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        conv = nn.Conv(
            self.features,
            (self.kernel_size,),
            strides=(self.stride,),
            padding=(self.padding,),
            kernel_dilation=(self.dilation,),
            feature_group_count=self.groups,
            use_bias=self.use_bias,
        )
        return jnp.transpose(conv(jnp.transpose(x, (0, 2, 1))), (0, 2, 1))  # NCL <-> NLC


@dataclasses.dataclass(frozen=True)
class EmbedSpec:
    num_embeddings: int
    features: int
    padding_idx: int | None

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        return Embed(self.num_embeddings, self.features, self.padding_idx)(x)


# PyTorch NCHW axis -> Flax NHWC axis, for a dim given to a 4-D activation.
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


@dataclasses.dataclass(frozen=True)
class ActSpec:
    """An activation of `jaxtrain.contrast.torch_ops.ACTIVATIONS` with its settings."""

    kind: str
    settings: tuple[tuple[str, Any], ...] = ()

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(self.settings)
        if "dim" in kw and kw["dim"] is not None and x.ndim == 4:
            kw["dim"] = _NHWC_AXIS[kw["dim"] % 4]
        return ops.ACTIVATIONS[self.kind](x, **kw)


@dataclasses.dataclass(frozen=True)
class DropoutSpec:
    """Dropout, active when the model runs with ``train=True`` (JAX's random mask)."""

    p: float

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        rng = module.make_rng("dropout") if train and self.p > 0 else None
        return ops.dropout(x, self.p, train=train, rng=rng)


@dataclasses.dataclass(frozen=True)
class AvgPoolSpec:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    count_include_pad: bool

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        return _torch_layout(
            lambda t: ops.avg_pool(
                t, self.kernel, self.stride, self.padding, self.count_include_pad
            ),
            x,
        )


@dataclasses.dataclass(frozen=True)
class AdaptiveAvgPoolSpec:
    output_size: tuple[int, int]

    def build(self, module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        return _torch_layout(lambda t: ops.adaptive_avg_pool(t, self.output_size), x)


# ---------------------------------------------------------------------------- converters
# Each takes (leaf, conversion) of `jaxtrain.contrast.convert` (`_Leaf`, `_Conversion`).


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def convert_batchnorm(leaf: Any, c: Any) -> None:
    """``BatchNorm1d`` on ``[B, C]``/``[B, C, L]``, ``BatchNorm2d`` on images -> `BatchNorm`."""
    layer = leaf.layer
    want = (2, 3) if isinstance(layer, c.tnn.BatchNorm1d) else (4,)
    if len(leaf.shape) not in want:
        raise leaf.unsupported(
            f"{type(layer).__name__} receives a {len(leaf.shape)}-D input of shape "
            f"{list(leaf.shape)}",
            "BatchNorm1d takes [batch, C] or [batch, C, L]; BatchNorm2d [batch, C, H, W].",
        )
    if c.perm is not None and len(leaf.shape) == 2:
        raise leaf.unsupported(
            "BatchNorm1d right after a Flatten of images (its features are in NCHW order)",
            "put the BatchNorm before the Flatten (BatchNorm2d) or after the next Linear.",
        )
    c.specs.append(
        BatchNormSpec(layer.momentum, float(layer.eps), layer.affine, layer.track_running_stats)
    )
    c.plan_weights("BatchNorm", leaf, "batchnorm", None)
    if layer.track_running_stats:
        c.stats.append((c.plan[-1].flax_name, leaf.name))


def convert_groupnorm(leaf: Any, c: Any) -> None:
    """``GroupNorm`` on ``[B, C, ...]`` -> `GroupNorm`."""
    layer = leaf.layer
    if len(leaf.shape) < 2 or (c.perm is not None and len(leaf.shape) == 2):
        raise leaf.unsupported(
            f"GroupNorm on an input of shape {list(leaf.shape)}",
            "apply it to [batch, C, ...] activations (before any Flatten).",
        )
    c.specs.append(GroupNormSpec(layer.num_groups, float(layer.eps), layer.affine))
    c.plan_weights("GroupNorm", leaf, "groupnorm", None)


def convert_conv1d(leaf: Any, c: Any) -> None:
    """``Conv1d`` (zero padding) on ``[B, C, L]`` -> ``nn.Conv`` on the transposed input."""
    layer = leaf.layer
    leaf.expect_ndim(3, "Conv1d receives", "give the layer [batch, channels, length] inputs.")
    if layer.padding_mode != "zeros":
        raise leaf.unsupported(
            f"padding_mode={layer.padding_mode!r}",
            "use padding_mode='zeros' (the only padding Flax's nn.Conv applies).",
        )
    k, d = int(layer.kernel_size[0]), int(layer.dilation[0])
    if layer.padding == "valid":
        pad = (0, 0)
    elif layer.padding == "same":
        tot = d * (k - 1)
        pad = (tot // 2, tot - tot // 2)
    else:
        pad = (int(layer.padding[0]),) * 2
    c.specs.append(
        Conv1dSpec(
            layer.out_channels,
            k,
            int(layer.stride[0]),
            pad,
            d,
            layer.groups,
            layer.bias is not None,
        )
    )
    c.plan_weights("Conv", leaf, "conv1d", None)


def convert_embedding(leaf: Any, c: Any) -> None:
    """``Embedding`` (no ``max_norm``) -> `Embed`."""
    layer = leaf.layer
    if layer.max_norm is not None or layer.scale_grad_by_freq:
        raise leaf.unsupported(
            f"max_norm={layer.max_norm}, scale_grad_by_freq={layer.scale_grad_by_freq} "
            "(max_norm rewrites the weights inside forward)",
            "use max_norm=None and scale_grad_by_freq=False.",
        )
    c.specs.append(EmbedSpec(layer.num_embeddings, layer.embedding_dim, layer.padding_idx))
    c.plan_weights("Embed", leaf, "embed", None)


def convert_activation(leaf: Any, c: Any) -> None:
    """SiLU, Sigmoid, LeakyReLU, ELU, ReLU6, Softplus, Softmax, LogSoftmax -> `ActSpec`."""
    layer, tnn = leaf.layer, c.tnn
    kinds: list[tuple[type, str, tuple[str, ...]]] = [
        (tnn.SiLU, "silu", ()),
        (tnn.Sigmoid, "sigmoid", ()),
        (tnn.LeakyReLU, "leaky_relu", ("negative_slope",)),
        (tnn.ELU, "elu", ("alpha",)),
        (tnn.ReLU6, "relu6", ()),
        (tnn.Softplus, "softplus", ("beta", "threshold")),
        (tnn.Softmax, "softmax", ("dim",)),
        (tnn.LogSoftmax, "log_softmax", ("dim",)),
    ]
    kind, names = next((k, n) for t, k, n in kinds if isinstance(layer, t))
    settings = tuple((n, getattr(layer, n)) for n in names)
    if names == ("dim",) and layer.dim is None:
        raise leaf.unsupported(
            f"{type(layer).__name__}(dim=None) picks its axis by a deprecated rule",
            f"give dim explicitly, e.g. nn.{type(layer).__name__}(dim=-1).",
        )
    # Softmax over the features right after a Flatten is fine: it commutes with the
    # pending NHWC permutation, which the next Linear undoes.
    c.specs.append(ActSpec(kind, settings))


def convert_dropout(leaf: Any, c: Any) -> None:
    """``Dropout`` -> active with ``train=True`` (JAX's mask), the identity otherwise."""
    if leaf.layer.p > 0:
        c.specs.append(DropoutSpec(float(leaf.layer.p)))


def _check_pool(leaf: Any, name: str) -> None:
    leaf.expect_ndim(4, f"{name} receives", "pool [batch, C, H, W] images only.")


def convert_avgpool2d(leaf: Any, c: Any) -> None:
    """``AvgPool2d`` (floor mode, no divisor override) -> `AvgPoolSpec`."""
    layer = leaf.layer
    _check_pool(leaf, "AvgPool2d")
    if layer.ceil_mode or layer.divisor_override is not None:
        raise leaf.unsupported(
            f"ceil_mode={layer.ceil_mode}, divisor_override={layer.divisor_override}",
            "use ceil_mode=False and divisor_override=None.",
        )
    k = _pair(layer.kernel_size)
    s = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
    c.specs.append(AvgPoolSpec(k, s, _pair(layer.padding), bool(layer.count_include_pad)))


def convert_adaptive_avgpool2d(leaf: Any, c: Any) -> None:
    """``AdaptiveAvgPool2d`` to sizes that divide the input (1x1 always) -> `AdaptiveAvgPoolSpec`."""
    _check_pool(leaf, "AdaptiveAvgPool2d")
    hw = leaf.shape[2:]
    out = ops.adaptive_output_size(hw, leaf.layer.output_size)
    if any(s % o for s, o in zip(hw, out, strict=True)):
        raise leaf.unsupported(
            f"AdaptiveAvgPool2d to {list(out)} from {list(hw)}: a size that does not divide "
            "the input gives overlapping windows of different sizes",
            "pool to a divisor of the input size (1 always works), or resize the input.",
        )
    c.specs.append(AdaptiveAvgPoolSpec((int(out[0]), int(out[1]))))


# ---------------------------------------------------------------------------- weights


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _affine_to_flax(layer: Any) -> dict[str, np.ndarray]:
    if getattr(layer, "weight", None) is None:
        return {}
    return {"scale": _np(layer.weight), "bias": _np(layer.bias)}


def _affine_to_torch(p: dict) -> dict[str, np.ndarray]:
    return {"weight": p["scale"], "bias": p["bias"]} if "scale" in p else {}


def _conv1d_to_flax(layer: Any) -> dict[str, np.ndarray]:
    out = {"kernel": _np(layer.weight).transpose(2, 1, 0)}  # OIK -> KIO
    if layer.bias is not None:
        out["bias"] = _np(layer.bias)
    return out


def _conv1d_to_torch(p: dict) -> dict[str, np.ndarray]:
    out = {"weight": p["kernel"].transpose(2, 1, 0)}
    if "bias" in p:
        out["bias"] = p["bias"]
    return out


# kind -> (torch layer -> Flax params, Flax params (numpy) -> torch attributes)
WEIGHT_KINDS: dict[str, tuple[Callable[[Any], dict], Callable[[dict], dict]]] = {
    "batchnorm": (_affine_to_flax, _affine_to_torch),
    "groupnorm": (_affine_to_flax, _affine_to_torch),
    "conv1d": (_conv1d_to_flax, _conv1d_to_torch),
    "embed": (
        lambda layer: {"embedding": _np(layer.weight)},
        lambda p: {"weight": p["embedding"]},
    ),
}

# BatchNorm buffers: Flax batch_stats name -> PyTorch buffer name.
STATS = {"mean": "running_mean", "var": "running_var", "num_batches_tracked": "num_batches_tracked"}


def converters(tnn: Any) -> dict[type, Callable[[Any, Any], None]]:
    """The layer types this module converts -> their converters."""
    acts = (tnn.SiLU, tnn.Sigmoid, tnn.LeakyReLU, tnn.ELU, tnn.ReLU6, tnn.Softplus)
    return {
        tnn.BatchNorm1d: convert_batchnorm,
        tnn.BatchNorm2d: convert_batchnorm,
        tnn.GroupNorm: convert_groupnorm,
        tnn.Conv1d: convert_conv1d,
        tnn.Embedding: convert_embedding,
        tnn.AvgPool2d: convert_avgpool2d,
        tnn.AdaptiveAvgPool2d: convert_adaptive_avgpool2d,
        tnn.Softmax: convert_activation,
        tnn.LogSoftmax: convert_activation,
        **dict.fromkeys(acts, convert_activation),
    }
