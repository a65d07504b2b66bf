"""PyTorch ``nn.Sequential`` -> an equivalent Flax linen model with identical weights.

What changes between the two frameworks, layer by layer:

=================  ==========================  ==========================================
PyTorch            Flax (linen)                weights
=================  ==========================  ==========================================
``Linear``         ``nn.Dense``                ``weight [out, in]`` -> ``kernel [in, out]``
``Conv2d``         ``nn.Conv``                 ``weight [O, I, kh, kw]`` (OIHW) ->
                                               ``kernel [kh, kw, I, O]`` (HWIO)
``LayerNorm``      ``nn.LayerNorm``            ``weight`` -> ``scale``; two-pass variance
``MaxPool2d``      ``nn.max_pool``             -
``ReLU/GELU/Tanh`` ``relu/gelu/tanh``          ``GELU()`` is exact erf (flax: approximate=False)
``Flatten``        ``reshape``                 see below
``Dropout``        dropout with ``train=True``  JAX's random mask (not PyTorch's)
=================  ==========================  ==========================================

More layers (BatchNorm, GroupNorm, Conv1d, Embedding, pooling, activations) are in
`jaxtrain.contrast.seq_layers`. A module that is not an ``nn.Sequential`` of built-in layers
(a ``forward`` of its own: residual blocks, ``torch.cat``) converts through ``torch.fx``
instead (`jaxtrain.contrast.fx`).

Images are NCHW in PyTorch and NHWC in Flax (`nchw_to_nhwc`). Flattening an NCHW
activation orders features ``(c, h, w)``; flattening NHWC orders them ``(h, w, c)``. The
converted model flattens the natural NHWC way and instead permutes the rows of the next
``Linear``'s kernel (and of a ``LayerNorm`` in between), so the logits are the same. A
``Flatten`` whose output reaches the model's output without a ``Linear`` transposes to
NCHW before flattening instead.

Layers are named the way Flax names them in a compact module (``Conv_0``, ``Dense_0``,
``LayerNorm_0``, ...), so the converted parameters of a PyTorch twin of jaxtrain's
`jaxtrain.models.MLP` or `jaxtrain.models.CNN` (see `torch_twin`) fit those models directly.

`from_torch` walks the layers once, handing each to its converter (one function per
PyTorch layer type, looked up in `_converters`), which checks the layer's settings and
appends its `Sequential` spec and weight mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxtrain.contrast._torch import require_torch
from jaxtrain.contrast.fx import FxConverted, check_x64, from_torch_fx
from jaxtrain.contrast.seq_layers import STATS, WEIGHT_KINDS, convert_dropout
from jaxtrain.contrast.seq_layers import converters as seq_converters
from jaxtrain.contrast.state_dict import layout_of, to_tensors
from jaxtrain.models.adapters import Model, from_linen

SUPPORTED = (
    "Linear, Conv1d, Conv2d, ReLU, GELU, Tanh, SiLU, Sigmoid, LeakyReLU, ELU, ReLU6, Softplus, "
    "Softmax, LogSoftmax, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout, LayerNorm, "
    "BatchNorm1d, BatchNorm2d, GroupNorm, Embedding, Identity and nested Sequential"
)


# ---------------------------------------------------------------------------- layer specs
# Hashable plain data: they are attributes of the linen module.


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    features: int
    use_bias: bool


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int
    use_bias: bool


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    kind: str  # "relu" | "gelu" | "gelu_tanh" | "tanh"


@dataclasses.dataclass(frozen=True)
class FlattenSpec:
    torch_order: bool  # True: transpose NHWC -> NCHW first (nothing after it re-orders)


@dataclasses.dataclass(frozen=True)
class MaxPoolSpec:
    window: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class LayerNormSpec:
    epsilon: float
    use_scale: bool
    use_bias: bool


class Sequential(nn.Module):
    """The converted model: the layers of a PyTorch ``nn.Sequential``, NHWC.

    Attributes:
        layers: the layer specs, in order.
    """

    layers: tuple[Any, ...]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: ``[B, H, W, C]`` (NHWC), ``[B, F]``, ``[B, T, F]``/``[B, C, L]`` or token ids
        ``[B, T]`` -> the PyTorch model's output. ``train``: ``model.train()`` (BatchNorm
        batch statistics, dropout) or ``model.eval()``."""
        for spec in self.layers:
            if hasattr(spec, "build"):  # the layers of jaxtrain.contrast.seq_layers
                x = spec.build(self, x, train)
            elif isinstance(spec, DenseSpec):
                x = nn.Dense(spec.features, use_bias=spec.use_bias)(x)
            elif isinstance(spec, ConvSpec):
                x = nn.Conv(
                    spec.features,
                    spec.kernel_size,
                    strides=spec.strides,
                    padding=spec.padding,
                    kernel_dilation=spec.dilation,
                    feature_group_count=spec.groups,
                    use_bias=spec.use_bias,
                )(x)
            elif isinstance(spec, ActivationSpec):
                x = _ACTIVATIONS[spec.kind](x)
            elif isinstance(spec, FlattenSpec):
                if spec.torch_order and x.ndim == 4:
                    x = jnp.transpose(x, (0, 3, 1, 2))  # NHWC -> NCHW, PyTorch's order
                x = x.reshape((x.shape[0], -1))
            elif isinstance(spec, MaxPoolSpec):
                x = nn.max_pool(x, spec.window, strides=spec.strides, padding=spec.padding)
            elif isinstance(spec, LayerNormSpec):
                # Two-pass variance, as PyTorch computes it (Flax's default is E[x²]-E[x]²).
                x = nn.LayerNorm(
                    epsilon=spec.epsilon,
                    use_scale=spec.use_scale,
                    use_bias=spec.use_bias,
                    use_fast_variance=False,
                )(x)
            else:  # pragma: no cover - specs are built by from_torch only
                raise TypeError(f"unknown layer spec {spec!r}")
        return x


_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "tanh": jnp.tanh,
}


# ---------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class _Weights:
    """How one PyTorch layer's weights become one Flax layer's parameters."""

    flax_name: str
    torch_name: str
    kind: str  # "dense" | "conv" | "layernorm"
    perm: tuple[int, ...] | None  # input-feature permutation (flatten order), or None


@dataclasses.dataclass(frozen=True)
class Converted:
    """A converted model: the Flax module, its parameters and the weight mapping.

    Attributes:
        module: the `Sequential` linen module (input NHWC ``[B, H, W, C]`` or ``[B, F]``).
        params: Flax parameters ``{"Dense_0": {"kernel", "bias"}, "Conv_0": ...}``, equal
            to the PyTorch weights at conversion time.
        input_shape: the PyTorch input shape of one example (``(C, H, W)`` or ``(F,)``).
        names: Flax layer name -> PyTorch module name (e.g. ``"Conv_0" -> "0"``).
        model_state: ``{"batch_stats": {"BatchNorm_0": {"mean", "var",
            "num_batches_tracked"}}}``: PyTorch's BatchNorm buffers at conversion time
            (``{}`` without BatchNorm).

    Example:
        >>> import numpy as np, torch
        >>> conv = from_torch(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), (4,))
        >>> conv.names, conv.input_shape
        ({'Dense_0': '1'}, (4,))
        >>> conv.apply(conv.params, np.ones((2, 4), np.float32)).shape  # [B, F] -> [B, 3]
        (2, 3)
    """

    module: Sequential
    params: dict
    input_shape: tuple[int, ...]
    names: dict[str, str]
    plan: tuple[_Weights, ...] = dataclasses.field(repr=False, default=())
    model_state: dict = dataclasses.field(default_factory=dict)
    stats: tuple[tuple[str, str], ...] = dataclasses.field(repr=False, default=())
    layout: dict = dataclasses.field(repr=False, default_factory=dict)

    def model(self) -> Model:
        """The module as a jaxtrain `Model` (``jaxtrain.from_linen``).

        Its ``init`` initialises afresh (Flax's initialisers): start training from the
        converted weights with ``TrainState.create(converted.params, optimizer, seed,
        model_state=converted.model_state)``.
        """
        return from_linen(self.module)

    def fn(
        self, params: dict, model_state: Any, x: Any, *, train: bool = False, rng: Any = None
    ) -> tuple[jax.Array, Any]:
        """``(output, new_model_state)`` on a PyTorch-layout input (NCHW made NHWC).

        ``train`` plays ``model.train()``: BatchNorm uses and updates batch statistics,
        dropout draws its mask from ``rng``.
        """
        variables = {"params": params, **model_state}
        x = jnp.asarray(nchw_to_nhwc(x))
        rngs = {"dropout": rng} if rng is not None else None
        if train and model_state:
            y, new = self.module.apply(
                variables, x, train=True, rngs=rngs, mutable=list(model_state)
            )
            return cast(jax.Array, y), {**model_state, **new}
        # cast: without mutable collections, apply returns the output alone.
        return cast(jax.Array, self.module.apply(variables, x, train=train, rngs=rngs)), model_state

    def apply(
        self,
        params: dict,
        x: Any,
        *,
        model_state: Any = None,
        train: bool = False,
        rng: Any = None,
    ) -> jax.Array:
        """Runs the Flax model on a PyTorch-layout input (NCHW converted to NHWC).

        ``model_state`` defaults to the converted `model_state`; see `fn` for ``train``.
        """
        state = self.model_state if model_state is None else model_state
        return self.fn(params, state, x, train=train, rng=rng)[0]

    def params_from(self, torch_model: Any) -> dict:
        """The current weights of ``torch_model`` (same architecture) as Flax params."""
        modules = dict(torch_model.named_modules())
        return {w.flax_name: _to_flax(w, modules[w.torch_name]) for w in self.plan}

    def state_from(self, torch_model: Any) -> dict:
        """The current BatchNorm buffers of ``torch_model`` as ``model_state``."""
        modules = dict(torch_model.named_modules())
        stats = {
            flax: {k: jnp.asarray(_numpy(getattr(modules[name], b))) for k, b in STATS.items()}
            for flax, name in self.stats
        }
        return {"batch_stats": stats} if stats else {}

    def state_dict(self, params: dict, model_state: Any = None) -> dict[str, Any]:
        """``params`` (+ ``model_state``) as a state dict of the original PyTorch module.

        Kernels are transposed back, the flatten permutation undone, BatchNorm's
        ``mean``/``var``/``num_batches_tracked`` become its buffers; every key of the
        original ``state_dict()`` is filled, in its dtype (bitwise copies of the values).

        Raises:
            ValueError: a key without a value, or a value of the wrong shape.
        """
        state = self.model_state if model_state is None else model_state
        values = {}
        for w in self.plan:
            for attr, v in _to_torch(w, params[w.flax_name]).items():
                values[_key(w.torch_name, attr)] = v
        for flax, name in self.stats:
            got = (state.get("batch_stats") or {}).get(flax, {})
            values.update({_key(name, b): got[k] for k, b in STATS.items() if k in got})
        return to_tensors(values, self.layout)

    def load_into(self, torch_model: Any, params: dict, model_state: Any = None) -> None:
        """Copies Flax ``params`` (and ``model_state``, when given) into ``torch_model``.

        The inverse of `params_from`: start a PyTorch model from JAX-initialised weights.
        """
        torch = require_torch()
        modules = dict(torch_model.named_modules())
        with torch.no_grad():
            for w in self.plan:
                for attr, value in _to_torch(w, params[w.flax_name]).items():
                    target = getattr(modules[w.torch_name], attr)
                    target.copy_(torch.from_numpy(np.array(value)))  # a writable copy
            for flax, name in self.stats if model_state else ():
                for k, b in STATS.items():
                    value = model_state["batch_stats"][flax][k]
                    getattr(modules[name], b).copy_(torch.from_numpy(np.array(value)))


def _key(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def nchw_to_nhwc(x: Any) -> np.ndarray:
    """A PyTorch-layout batch as a Flax-layout one.

    Args:
        x: numpy array, JAX array or torch tensor; ``[B, C, H, W]`` or ``[B, F]``.

    Returns:
        numpy ``[B, H, W, C]`` for 4-D input; anything else unchanged (as numpy).

    Example:
        >>> import numpy as np
        >>> nchw_to_nhwc(np.zeros((2, 3, 8, 8))).shape
        (2, 8, 8, 3)
    """
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def nhwc_to_nchw(x: Any) -> np.ndarray:
    """The inverse of `nchw_to_nhwc`: ``[B, H, W, C]`` -> ``[B, C, H, W]`` (numpy).

    Args:
        x: numpy array, JAX array or torch tensor; ``[B, H, W, C]`` or ``[B, F]``.

    Returns:
        numpy ``[B, C, H, W]`` for 4-D input; anything else unchanged (as numpy).

    Example:
        >>> import numpy as np
        >>> nhwc_to_nchw(np.zeros((2, 8, 8, 3))).shape
        (2, 3, 8, 8)
    """
    x = np.asarray(x)
    return np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _to_flax(w: _Weights, layer: Any) -> dict:
    if w.kind in WEIGHT_KINDS:
        extra = WEIGHT_KINDS[w.kind][0](layer)
        return {k: jnp.asarray(np.ascontiguousarray(v)) for k, v in extra.items()}
    if w.kind == "dense":
        kernel = _numpy(layer.weight).T  # [out, in] -> [in, out]
        if w.perm is not None:
            kernel = kernel[list(w.perm)]
        out = {"kernel": kernel}
    elif w.kind == "conv":
        out = {"kernel": _numpy(layer.weight).transpose(2, 3, 1, 0)}  # OIHW -> HWIO
    else:  # layernorm
        out = {}
        if layer.weight is not None:
            out["scale"] = _numpy(layer.weight)
        if w.perm is not None and "scale" in out:
            out["scale"] = out["scale"][list(w.perm)]
    if getattr(layer, "bias", None) is not None:
        bias = _numpy(layer.bias)
        if w.kind == "layernorm" and w.perm is not None:
            bias = bias[list(w.perm)]
        out["bias"] = bias
    return {k: jnp.asarray(np.ascontiguousarray(v)) for k, v in out.items()}


def _unpermute(v: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    if perm is None:
        return v
    out = np.empty_like(v)
    out[list(perm)] = v
    return out


def _to_torch(w: _Weights, p: dict) -> dict[str, np.ndarray]:
    p = {k: np.asarray(v) for k, v in p.items()}
    if w.kind in WEIGHT_KINDS:
        return WEIGHT_KINDS[w.kind][1](p)
    if w.kind == "dense":
        out = {"weight": _unpermute(p["kernel"], w.perm).T}
    elif w.kind == "conv":
        out = {"weight": p["kernel"].transpose(3, 2, 0, 1)}  # HWIO -> OIHW
    else:
        out = {"weight": _unpermute(p["scale"], w.perm)} if "scale" in p else {}
    if "bias" in p:
        out["bias"] = _unpermute(p["bias"], w.perm) if w.kind == "layernorm" else p["bias"]
    return out


def _leaves(module: Any, prefix: str, torch: Any) -> list[tuple[str, Any]]:
    out = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, torch.nn.Sequential):
            out.extend(_leaves(child, full, torch))
        else:
            out.append((full, child))
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _unsupported(name: str, layer: Any, why: str, fix: str) -> ValueError:
    return ValueError(
        f"cannot convert layer '{name}' ({layer!r}): {why}. Supported layers: {SUPPORTED}. "
        f"Fix: {fix}"
    )


def _model_leaves(torch_model: Any, torch: Any) -> list[tuple[str, Any]]:
    """The ``(module name, layer)`` pairs of ``torch_model``, nested Sequentials flattened.

    Raises:
        TypeError: ``torch_model`` is not an ``nn.Module``.
        ValueError: it is a module with children that is not an ``nn.Sequential``.
    """
    tnn = torch.nn
    if not isinstance(torch_model, tnn.Module):
        raise TypeError(
            f"from_torch expects a torch.nn.Module (an nn.Sequential); got "
            f"{type(torch_model).__name__}."
        )
    if isinstance(torch_model, tnn.Sequential):
        return _leaves(torch_model, "", torch)
    return [("", torch_model)]  # a single layer (modules with children go through fx)


def _goes_through_fx(torch_model: Any, torch: Any) -> bool:
    """True for a module with a ``forward`` of its own: not a Sequential of built-in layers."""
    tnn = torch.nn
    if not isinstance(torch_model, tnn.Module):
        return False
    layers = [lay for _, lay in _leaves(torch_model, "", torch)]
    if not isinstance(torch_model, tnn.Sequential):
        layers = [torch_model]
    return any(not type(layer).__module__.startswith("torch.nn.") for layer in layers)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One PyTorch layer as the conversion meets it: name, layer, input shape, position."""

    index: int
    name: str
    layer: Any
    shape: tuple[int, ...]  # the layer's input shape, batch of 1 included

    def unsupported(self, why: str, fix: str) -> ValueError:
        """The error for this layer: its name (or type), ``why`` and the ``fix``."""
        return _unsupported(self.name or type(self.layer).__name__, self.layer, why, fix)

    def expect_ndim(self, ndim: int, what: str, fix: str) -> None:
        """Raises unless the input is ``ndim``-D; ``what`` names the layer's input."""
        if len(self.shape) != ndim:
            raise self.unsupported(
                f"{what} a {len(self.shape)}-D input of shape {list(self.shape)}", fix
            )


@dataclasses.dataclass
class _Conversion:
    """What one `from_torch` pass has built so far.

    ``perm`` is the pending flatten permutation: Flax feature ``j`` is PyTorch feature
    ``perm[j]`` until the next ``Linear`` absorbs it.
    """

    tnn: Any  # torch.nn
    leaves: list[tuple[str, Any]]
    specs: list[Any] = dataclasses.field(default_factory=list)
    plan: list[_Weights] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    perm: tuple[int, ...] | None = None
    stats: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # BatchNorm buffers

    def plan_weights(
        self, flax_layer: str, leaf: _Leaf, kind: str, perm: tuple[int, ...] | None
    ) -> None:
        """Plans the next ``{flax_layer}_{i}`` to take ``leaf``'s weights (``kind``)."""
        i = self.counts.get(flax_layer, 0)
        self.counts[flax_layer] = i + 1
        self.plan.append(_Weights(f"{flax_layer}_{i}", leaf.name, kind, perm))

    def later_layers(self, leaf: _Leaf) -> list[Any]:
        """The layers after ``leaf``, in order."""
        return [lay for _, lay in self.leaves[leaf.index + 1 :]]


def _convert_linear(leaf: _Leaf, c: _Conversion) -> None:
    """``Linear`` on ``[B, F]`` or ``[B, T, F]`` -> ``Dense``; its kernel absorbs a pending
    flatten permutation."""
    if len(leaf.shape) != 3:
        leaf.expect_ndim(
            2,
            "Linear receives",
            "add nn.Flatten() before it (Linear on [batch, features] or "
            "[batch, tokens, features] converts).",
        )
    layer = leaf.layer
    c.specs.append(DenseSpec(layer.out_features, layer.bias is not None))
    c.plan_weights("Dense", leaf, "dense", c.perm)
    c.perm = None


def _conv_padding(layer: Any, k: tuple[int, int], d: tuple[int, int]) -> tuple:
    """A ``Conv2d``'s padding as Flax's ``((top, bottom), (left, right))``."""
    if not isinstance(layer.padding, str):
        p = _pair(layer.padding)
        return ((p[0], p[0]), (p[1], p[1]))
    if layer.padding == "valid":
        return ((0, 0), (0, 0))
    # "same": the extra pixel of an even kernel goes after, as in XLA.
    tot = [d[j] * (k[j] - 1) for j in range(2)]
    return tuple((t // 2, t - t // 2) for t in tot)


def _convert_conv2d(leaf: _Leaf, c: _Conversion) -> None:
    """``Conv2d`` (zero padding) -> ``Conv``."""
    layer = leaf.layer
    leaf.expect_ndim(
        4, "Conv2d receives", "give the model [batch, channels, height, width] images."
    )
    if layer.padding_mode != "zeros":
        raise leaf.unsupported(
            f"padding_mode={layer.padding_mode!r}",
            "use padding_mode='zeros' (the only padding Flax's nn.Conv applies).",
        )
    k, d = _pair(layer.kernel_size), _pair(layer.dilation)
    pad = _conv_padding(layer, k, d)
    c.specs.append(
        ConvSpec(
            layer.out_channels, k, _pair(layer.stride), pad, d, layer.groups, layer.bias is not None
        )
    )
    c.plan_weights("Conv", leaf, "conv", None)


def _convert_activation(leaf: _Leaf, c: _Conversion) -> None:
    """``ReLU``, ``Tanh``, ``GELU`` (exact or tanh) -> the same activation."""
    layer, tnn = leaf.layer, c.tnn
    if isinstance(layer, tnn.GELU):
        kind = "gelu_tanh" if layer.approximate == "tanh" else "gelu"
    else:
        kind = "relu" if isinstance(layer, tnn.ReLU) else "tanh"
    c.specs.append(ActivationSpec(kind))


def _nchw_flatten_perm(c: int, h: int, w: int) -> tuple[int, ...]:
    """``perm[j]``: the PyTorch (``c, h, w``) feature at Flax (``h, w, c``) position ``j``."""
    perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()
    return tuple(int(j) for j in perm)


def _convert_flatten(leaf: _Leaf, c: _Conversion) -> None:
    """``Flatten()`` -> a reshape in NHWC order (a later ``Linear`` permuted) or NCHW."""
    layer, shape = leaf.layer, leaf.shape
    if layer.start_dim != 1 or layer.end_dim != -1:
        raise leaf.unsupported(
            f"Flatten(start_dim={layer.start_dim}, end_dim={layer.end_dim})",
            "use nn.Flatten() (start_dim=1, end_dim=-1).",
        )
    if len(shape) in (2, 3):  # a no-op, or [B, C, L] kept in PyTorch's layout
        c.specs.append(FlattenSpec(torch_order=False))
    elif len(shape) != 4:
        raise leaf.unsupported(
            f"Flatten of a {len(shape)}-D input of shape {list(shape)}",
            "flatten [batch, C, H, W] images, [batch, C, L] or [batch, F] only.",
        )
    elif any(isinstance(lay, c.tnn.Linear) for lay in c.later_layers(leaf)):
        # A later Linear absorbs the order: permute its kernel rows, flatten NHWC.
        c.perm = _nchw_flatten_perm(*shape[1:])
        c.specs.append(FlattenSpec(torch_order=False))
    else:
        c.specs.append(FlattenSpec(torch_order=True))


def _convert_maxpool2d(leaf: _Leaf, c: _Conversion) -> None:
    """``MaxPool2d`` (no dilation, floor mode) -> ``max_pool``."""
    layer = leaf.layer
    leaf.expect_ndim(4, "MaxPool2d receives", "pool [batch, C, H, W] images only.")
    if _pair(layer.dilation) != (1, 1) or layer.ceil_mode or layer.return_indices:
        raise leaf.unsupported(
            f"dilation={layer.dilation}, ceil_mode={layer.ceil_mode}, "
            f"return_indices={layer.return_indices}",
            "use dilation=1, ceil_mode=False, return_indices=False.",
        )
    k = _pair(layer.kernel_size)
    s = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
    p = _pair(layer.padding)
    c.specs.append(MaxPoolSpec(k, s, ((p[0], p[0]), (p[1], p[1]))))


def _convert_layernorm(leaf: _Leaf, c: _Conversion) -> None:
    """``LayerNorm`` over the last axis of a ``[B, F]`` or ``[B, T, F]`` input -> ``LayerNorm``."""
    layer, shape = leaf.layer, leaf.shape
    if len(shape) not in (2, 3) or tuple(layer.normalized_shape) != (shape[-1],):
        raise leaf.unsupported(
            f"LayerNorm(normalized_shape={tuple(layer.normalized_shape)}) on an input "
            f"of shape {list(shape)}",
            "normalise the last axis of a [batch, features] or [batch, tokens, features] "
            "activation (put nn.Flatten() before it for images).",
        )
    affine = layer.weight is not None
    c.specs.append(LayerNormSpec(float(layer.eps), affine, layer.bias is not None))
    c.plan_weights("LayerNorm", leaf, "layernorm", c.perm)


def _convert_identity(leaf: _Leaf, c: _Conversion) -> None:
    """``Identity`` -> nothing."""


def _reject(leaf: _Leaf, c: _Conversion) -> None:
    """Any other layer: the error naming it and the supported layers."""
    raise leaf.unsupported(
        f"{type(leaf.layer).__name__} is not supported",
        "remove it or replace it by supported layers.",
    )


def _converters(tnn: Any) -> dict[type, Callable[[_Leaf, _Conversion], None]]:
    """PyTorch layer type -> its converter, in the order `from_torch` tries them."""
    return {
        tnn.Linear: _convert_linear,
        tnn.Conv2d: _convert_conv2d,
        tnn.ReLU: _convert_activation,
        tnn.Tanh: _convert_activation,
        tnn.GELU: _convert_activation,
        tnn.Flatten: _convert_flatten,
        tnn.MaxPool2d: _convert_maxpool2d,
        tnn.LayerNorm: _convert_layernorm,
        tnn.Dropout: convert_dropout,
        tnn.Identity: _convert_identity,
        **seq_converters(tnn),
    }


def from_torch(
    torch_model: Any, input_shape: Sequence[int], *, input_dtype: Any = None
) -> Converted | FxConverted:
    """Converts a PyTorch model into an equivalent JAX model with identical weights.

    An ``nn.Sequential`` of built-in layers becomes a Flax `Sequential` (a `Converted`,
    Flax names and layouts: ``Dense_0``, NHWC). Any other module (a ``forward`` of its
    own) goes through ``torch.fx`` (`jaxtrain.contrast.fx.from_torch_fx`: a pure function
    with PyTorch's names and layouts, an `FxConverted`). Both offer ``params``,
    ``model_state``, ``apply``, ``fn``, ``model()``, ``params_from``, ``state_dict`` and
    ``load_into``.

    Args:
        torch_model: an ``nn.Module``. In an ``nn.Sequential`` (nested ones allowed): the
            layers of `SUPPORTED` — ``Linear`` (on ``[B, F]`` or ``[B, T, F]``),
            ``Conv1d``, ``Conv2d``, BatchNorm, GroupNorm, LayerNorm (last axis), pooling,
            ``Embedding``, activations, ``Dropout`` (active with ``train=True``).
        input_shape: the PyTorch shape of one example, without the batch dimension:
            ``(C, H, W)`` for images, ``(F,)`` for vectors, ``(T,)`` for token ids. Needed
            to trace the shapes (the flatten permutation depends on ``C, H, W``).
        input_dtype: the input's dtype for tracing (default: integer ids when the first
            layer is an ``Embedding``, else the dtype of the model's parameters, so a
            ``.double()`` model traces in float64).

    Returns:
        A `Converted` (``nn.Sequential``) or `FxConverted`: ``converted.apply(
        converted.params, x)`` equals ``torch_model.eval()(x)``; ``converted.fn(params,
        model_state, x, train=True, rng=key)`` is ``torch_model.train()(x)`` and its
        BatchNorm buffer updates.

    Raises:
        ValueError: naming the first unsupported layer (or setting, or fx node) and the
            fix; float64 weights while JAX's x64 mode is off.
        TypeError: when ``torch_model`` is not an ``nn.Module``.

    Example:
        >>> import numpy as np, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> conv = from_torch(net, (4,))
        >>> conv.params["Dense_0"]["kernel"].shape  # PyTorch's [out, in] weight, transposed
        (4, 3)
        >>> x = np.ones((2, 4), np.float32)  # [B, F]
        >>> expected = net(torch.from_numpy(x)).detach().numpy()
        >>> bool(np.allclose(conv.apply(conv.params, x), expected, atol=1e-6))
        True
    """
    torch = require_torch()
    if _goes_through_fx(torch_model, torch):
        return from_torch_fx(torch_model, input_shape, input_dtype=input_dtype)
    leaves = _model_leaves(torch_model, torch)
    for p in torch_model.parameters():
        check_x64(str(p.dtype).removeprefix("torch."), f"parameter dtype {p.dtype}")
    input_shape = tuple(int(d) for d in input_shape)
    conversion = _Conversion(torch.nn, leaves)
    converters = _converters(torch.nn)
    x = torch.zeros((1, *input_shape), dtype=_trace_dtype(torch, torch_model, leaves, input_dtype))
    for i, (name, layer) in enumerate(leaves):
        convert = next((f for t, f in converters.items() if isinstance(layer, t)), _reject)
        convert(_Leaf(i, name, layer, tuple(x.shape)), conversion)
        x = _traced(torch, layer, x)  # the next layer's input shape
    converted = Converted(
        module=Sequential(tuple(conversion.specs)),
        params={},
        input_shape=input_shape,
        names={w.flax_name: w.torch_name for w in conversion.plan},
        plan=tuple(conversion.plan),
        stats=tuple(conversion.stats),
        layout=layout_of(torch_model),
    )
    return dataclasses.replace(
        converted,
        params=converted.params_from(torch_model),
        model_state=converted.state_from(torch_model),
    )


def _trace_dtype(torch: Any, torch_model: Any, leaves: list, input_dtype: Any) -> Any:
    """The dtype of the shape-tracing input: no float32 assumption (``.double()`` models)."""
    if input_dtype is not None:
        return getattr(torch, np.dtype(input_dtype).name)
    if leaves and isinstance(leaves[0][1], torch.nn.Embedding):
        return torch.long
    floats = [p.dtype for p in torch_model.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.get_default_dtype()


def _traced(torch: Any, layer: Any, x: Any) -> Any:
    """``layer(x)`` in eval mode, without gradients: shapes only, the model left untouched
    (a BatchNorm in training mode would update its running statistics)."""
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.train(was_training)


def torch_twin(module: nn.Module, input_shape: Sequence[int]) -> Any:
    """A PyTorch ``nn.Sequential`` with the architecture of jaxtrain's MLP or CNN.

    Its weights are PyTorch's default initialisation; ``from_torch(twin, input_shape)``
    gives parameters with exactly the tree of ``module.init(...)["params"]``.

    Args:
        module: a `jaxtrain.models.MLP` or `jaxtrain.models.CNN`.
        input_shape: PyTorch shape of one example, e.g. ``(1, 8, 8)`` for the digits.

    Returns:
        ``torch.nn.Sequential``: for a CNN, per width ``c``: Conv2d(3x3, padding 1),
        ReLU, Conv2d, ReLU, MaxPool2d(2); then Flatten, Dropout, Linear, ReLU, Dropout,
        Linear. For an MLP: Flatten, then Linear + ReLU (+ Dropout) per hidden width,
        then Linear.

    Example:
        >>> import jaxtrain as jt
        >>> twin = torch_twin(jt.models.MLP(hidden=(8,), num_outputs=3), (4,))
        >>> [type(m).__name__ for m in twin]
        ['Flatten', 'Linear', 'ReLU', 'Linear']
        >>> from_torch(twin, (4,)).params["Dense_1"]["kernel"].shape  # jt.models.MLP's tree
        (8, 3)
    """
    from jaxtrain.models.builtin import CNN, MLP

    tnn = require_torch().nn
    shape = tuple(int(d) for d in input_shape)
    if isinstance(module, MLP):
        return tnn.Sequential(*_mlp_twin_layers(module, shape, tnn))
    if isinstance(module, CNN):
        return tnn.Sequential(*_cnn_twin_layers(module, shape, tnn))
    raise TypeError(
        f"torch_twin knows jaxtrain.models.MLP and jaxtrain.models.CNN; got {type(module).__name__}. "
        "Fix: build the nn.Sequential yourself and convert it with from_torch."
    )


def _mlp_twin_layers(module: Any, shape: tuple[int, ...], tnn: Any) -> list[Any]:
    """The PyTorch layers of a `jaxtrain.models.MLP` on examples of ``shape``."""
    width = int(np.prod(shape))
    layers: list[Any] = [tnn.Flatten()]
    for h in module.hidden:
        layers += [tnn.Linear(width, h), tnn.ReLU()]
        if module.dropout:
            layers.append(tnn.Dropout(module.dropout))
        width = h
    layers.append(tnn.Linear(width, module.num_outputs))
    return layers


def _cnn_twin_layers(module: Any, shape: tuple[int, ...], tnn: Any) -> list[Any]:
    """The PyTorch layers of a `jaxtrain.models.CNN` on ``(C, H, W)`` examples."""
    if len(shape) != 3:
        raise ValueError(
            f"torch_twin of a CNN needs input_shape (C, H, W); got {shape}. "
            "Fix: e.g. (1, 8, 8) for the digits."
        )
    c_in, h, w = shape
    layers: list[Any] = []
    for c in module.channels:
        layers += [
            tnn.Conv2d(c_in, c, 3, padding=1),
            tnn.ReLU(),
            tnn.Conv2d(c, c, 3, padding=1),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
        ]
        c_in, h, w = c, h // 2, w // 2
    layers += [
        tnn.Flatten(),
        tnn.Dropout(module.dropout),
        tnn.Linear(c_in * h * w, module.dense),
        tnn.ReLU(),
        tnn.Dropout(module.dropout),
        tnn.Linear(module.dense, module.num_classes),
    ]
    return layers
