"""Any ``torch.fx``-traceable PyTorch module -> a pure JAX function with the same parameters.

``torch.fx.symbolic_trace`` records a module's ``forward`` as a graph of calls: submodules
(``call_module``), functions such as ``torch.flatten``, ``+`` or ``torch.cat``
(``call_function``) and tensor methods such as ``.view`` or ``.mean`` (``call_method``).
`from_torch_fx` reads that graph once and returns `FxConverted`, whose `FxConverted.fn`
replays it with JAX operations (`jaxtrain.contrast.torch_ops`), in PyTorch's layout
(NCHW), on explicit parameters::

    y, new_model_state = converted.fn(params, model_state, x, train=True, rng=key)

``params`` is ``{module path: {parameter name: array}}`` with PyTorch's names and layouts
(``params["layer1.0.conv1"]["weight"]`` is the OIHW kernel of ``model.layer1[0].conv1``);
``model_state`` holds the buffers the same way (BatchNorm's ``running_mean``,
``running_var``, ``num_batches_tracked``). So the state-dict key ``"layer1.0.conv1.weight"``
is ``params["layer1.0.conv1"]["weight"]``, and `FxConverted.state_dict` goes back.

``train=`` plays ``model.train()`` / ``model.eval()``: BatchNorm normalises with batch
statistics and updates ``model_state`` in training, and with the running statistics
otherwise; dropout (``nn.Dropout`` and ``F.dropout``) is active in training only, with
JAX's random numbers (not PyTorch's). Python control flow in ``forward`` was fixed when
the graph was traced (fx's own rule), ``self.training`` included.

A node the converter does not know is an error naming the node, its call and the source
line of ``forward`` it came from.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.contrast import torch_ops as ops
from jaxtrain.contrast._torch import require_torch
from jaxtrain.contrast.state_dict import layout_of, tensors_for
from jaxtrain.models.adapters import Model

Params = dict[str, dict[str, jax.Array]]


class _Unsupported(Exception):
    """Raised by a node's handler: ``why`` it cannot convert and the ``fix``."""

    def __init__(self, why: str, fix: str):
        super().__init__(why)
        self.why, self.fix = why, fix


@dataclasses.dataclass
class _Ctx:
    """What a handler sees while the graph runs."""

    params: Params
    state: dict[str, dict[str, jax.Array]]  # updated in place (a copy of model_state)
    train: bool
    rng: Any
    node_index: int = 0

    def key(self) -> Any:
        """A key for this node's randomness: fold_in(rng, node index)."""
        return None if self.rng is None else jax.random.fold_in(self.rng, self.node_index)


# ---------------------------------------------------------------------------- call_module


def _pair_like(v: Any, n: int) -> tuple[int, ...]:
    return (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)


def _conv_pads(m: Any, n: int) -> list[tuple[int, int]]:
    k, d = _pair_like(m.kernel_size, n), _pair_like(m.dilation, n)
    if m.padding == "valid":
        return [(0, 0)] * n
    if m.padding == "same":  # the extra pixel of an even kernel goes after, as in PyTorch
        tot = [d[j] * (k[j] - 1) for j in range(n)]
        return [(t // 2, t - t // 2) for t in tot]
    return [(p, p) for p in _pair_like(m.padding, n)]


def _conv(m: Any, p: dict, x: Any, ctx: _Ctx) -> Any:
    n = x.ndim - 2
    if m.padding_mode != "zeros":
        raise _Unsupported(
            f"padding_mode={m.padding_mode!r}", "use padding_mode='zeros' (zero padding only)."
        )
    return ops.conv(
        x,
        p["weight"],
        p.get("bias"),
        _pair_like(m.stride, n),
        _conv_pads(m, n),
        _pair_like(m.dilation, n),
        m.groups,
    )


def _batch_norm(m: Any, p: dict, x: Any, ctx: _Ctx, path: str) -> Any:
    stats = ctx.state.get(path) if m.track_running_stats else None
    y, new = ops.batch_norm(
        x,
        p.get("weight"),
        p.get("bias"),
        stats,
        train=ctx.train,
        momentum=m.momentum,
        eps=m.eps,
    )
    if ctx.train and new is not None:
        ctx.state[path] = {**ctx.state[path], **new}
    return y


def _check_pool(m: Any, dilation: bool) -> None:
    if m.ceil_mode or getattr(m, "return_indices", False):
        raise _Unsupported(
            f"ceil_mode={m.ceil_mode}, return_indices={getattr(m, 'return_indices', False)}",
            "use ceil_mode=False and return_indices=False.",
        )
    if dilation and _pair_like(m.dilation, 1) != (1,) and set(_pair_like(m.dilation, 2)) != {1}:
        raise _Unsupported(f"dilation={m.dilation}", "use dilation=1.")
    if getattr(m, "divisor_override", None) is not None:
        raise _Unsupported(f"divisor_override={m.divisor_override}", "use divisor_override=None.")


def _max_pool(m: Any, x: Any) -> Any:
    _check_pool(m, dilation=True)
    n = x.ndim - 2
    k = _pair_like(m.kernel_size, n)
    s = _pair_like(m.stride if m.stride is not None else m.kernel_size, n)
    return ops.max_pool(x, k, s, _pair_like(m.padding, n))


def _avg_pool(m: Any, x: Any) -> Any:
    _check_pool(m, dilation=False)
    n = x.ndim - 2
    k = _pair_like(m.kernel_size, n)
    s = _pair_like(m.stride if m.stride is not None else m.kernel_size, n)
    return ops.avg_pool(x, k, s, _pair_like(m.padding, n), m.count_include_pad)


def _adaptive(x: Any, output_size: Any) -> Any:
    try:
        return ops.adaptive_avg_pool(x, ops.adaptive_output_size(x.shape[2:], output_size))
    except ValueError as e:
        raise _Unsupported(str(e).split(". Fix: ")[0], str(e).split(". Fix: ")[1]) from None


def _embedding(m: Any, p: dict, x: Any) -> Any:
    if m.max_norm is not None or m.scale_grad_by_freq:
        raise _Unsupported(
            f"max_norm={m.max_norm}, scale_grad_by_freq={m.scale_grad_by_freq} (max_norm "
            "rewrites the weights inside forward)",
            "use max_norm=None and scale_grad_by_freq=False.",
        )
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise _Unsupported(
            f"Embedding got {x.dtype} input", "give integer token ids (input_dtype='int32')."
        )
    return ops.embedding(x, p["weight"], m.padding_idx)


def _flatten(x: Any, start_dim: int = 0, end_dim: int = -1) -> Any:
    s, e = start_dim % max(x.ndim, 1), end_dim % max(x.ndim, 1)
    return x.reshape((*x.shape[:s], -1, *x.shape[e + 1 :]))


def _module_handlers(tnn: Any) -> dict[type, Callable[..., Any]]:
    """PyTorch layer type -> ``handler(module, params, x, ctx, path)``."""
    act = ops.ACTIVATIONS

    def gelu(m, p, x, ctx, path):
        return act["gelu_tanh" if m.approximate == "tanh" else "gelu"](x)

    def simple(kind: str) -> Callable[..., Any]:
        return lambda m, p, x, ctx, path: act[kind](x)

    return {
        tnn.Linear: lambda m, p, x, ctx, path: ops.linear(x, p["weight"], p.get("bias")),
        tnn.Conv1d: lambda m, p, x, ctx, path: _conv(m, p, x, ctx),
        tnn.Conv2d: lambda m, p, x, ctx, path: _conv(m, p, x, ctx),
        tnn.BatchNorm1d: _batch_norm,
        tnn.BatchNorm2d: _batch_norm,
        tnn.LayerNorm: lambda m, p, x, ctx, path: ops.layer_norm(
            x, len(m.normalized_shape), p.get("weight"), p.get("bias"), m.eps
        ),
        tnn.GroupNorm: lambda m, p, x, ctx, path: ops.group_norm(
            x, m.num_groups, p.get("weight"), p.get("bias"), m.eps
        ),
        tnn.Embedding: lambda m, p, x, ctx, path: _embedding(m, p, x),
        tnn.MaxPool1d: lambda m, p, x, ctx, path: _max_pool(m, x),
        tnn.MaxPool2d: lambda m, p, x, ctx, path: _max_pool(m, x),
        tnn.AvgPool1d: lambda m, p, x, ctx, path: _avg_pool(m, x),
        tnn.AvgPool2d: lambda m, p, x, ctx, path: _avg_pool(m, x),
        tnn.AdaptiveAvgPool1d: lambda m, p, x, ctx, path: _adaptive(x, m.output_size),
        tnn.AdaptiveAvgPool2d: lambda m, p, x, ctx, path: _adaptive(x, m.output_size),
        tnn.Flatten: lambda m, p, x, ctx, path: _flatten(x, m.start_dim, m.end_dim),
        tnn.Dropout: lambda m, p, x, ctx, path: ops.dropout(
            x, m.p, train=ctx.train, rng=ctx.key(), where=f"Dropout '{path}'"
        ),
        tnn.Identity: simple("identity"),
        tnn.ReLU: simple("relu"),
        tnn.GELU: gelu,
        tnn.Tanh: simple("tanh"),
        tnn.Sigmoid: simple("sigmoid"),
        tnn.SiLU: simple("silu"),
        tnn.ReLU6: simple("relu6"),
        tnn.LeakyReLU: lambda m, p, x, ctx, path: act["leaky_relu"](x, m.negative_slope),
        tnn.ELU: lambda m, p, x, ctx, path: act["elu"](x, m.alpha),
        tnn.Softplus: lambda m, p, x, ctx, path: ops.softplus(x, m.beta, m.threshold),
        tnn.Softmax: lambda m, p, x, ctx, path: act["softmax"](x, m.dim),
        tnn.LogSoftmax: lambda m, p, x, ctx, path: act["log_softmax"](x, m.dim),
    }


# ---------------------------------------------------------------------------- functions, methods


def _shape(args: tuple) -> tuple[int, ...]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def _axes(dim: Any) -> Any:
    return tuple(dim) if isinstance(dim, (list, tuple)) else dim


def _reduce(f: Callable) -> Callable:
    def run(x, dim=None, keepdim=False, dtype=None):
        return f(x, axis=_axes(dim), keepdims=keepdim)

    return run


def _squeeze(x: Any, dim: Any = None) -> Any:
    if dim is None:
        return jnp.squeeze(x)
    dims = [d % x.ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
    return jnp.squeeze(x, tuple(d for d in dims if x.shape[d] == 1))  # PyTorch: no-op otherwise


def _size(x: Any, dim: int | None = None) -> Any:
    return tuple(x.shape) if dim is None else x.shape[dim]


def _cat(tensors: Any, dim: int = 0) -> Any:
    return jnp.concatenate(list(tensors), axis=dim)


def _softmax_fn(kind: str) -> Callable:
    def run(x, dim=None, _stacklevel=3, dtype=None):
        return ops.ACTIVATIONS[kind](x, dim)

    return run


def _pool_fn(kind: str) -> Callable:
    def run(x, kernel_size, stride=None, padding=0, *rest, **kw):
        n = x.ndim - 2
        k = _pair_like(kernel_size, n)
        s = _pair_like(stride if stride not in (None, []) else kernel_size, n)
        ceil = kw.get("ceil_mode", False)
        if ceil or kw.get("return_indices") or kw.get("divisor_override") is not None:
            raise _Unsupported(f"settings {kw}", "use ceil_mode=False and the defaults.")
        if kind == "max":
            if set(_pair_like(kw.get("dilation", 1), n)) != {1}:
                raise _Unsupported(f"dilation={kw['dilation']}", "use dilation=1.")
            return ops.max_pool(x, k, s, _pair_like(padding, n))
        return ops.avg_pool(x, k, s, _pair_like(padding, n), kw.get("count_include_pad", True))

    return run


def _conv_fn(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv1d`` / ``F.conv2d`` (what a custom subclass of ``nn.Conv2d`` traces to)."""
    n = x.ndim - 2
    k, d = weight.shape[2:], _pair_like(dilation, n)
    if padding == "valid":
        pads = [(0, 0)] * n
    elif padding == "same":
        pads = [
            (d[j] * (k[j] - 1) // 2, d[j] * (k[j] - 1) - d[j] * (k[j] - 1) // 2) for j in range(n)
        ]
    else:
        pads = [(p, p) for p in _pair_like(padding, n)]
    return ops.conv(x, weight, bias, _pair_like(stride, n), pads, d, groups)


def _dropout_fn(ctx: _Ctx) -> Callable:
    def run(x, p=0.5, training=True, inplace=False):
        # `training` is a constant of the trace; the JAX side follows train= instead.
        return ops.dropout(x, p, train=ctx.train, rng=ctx.key(), where="F.dropout")

    return run


def _common() -> dict[str, Callable]:
    """Functions that exist as a tensor method and a ``torch.*`` function alike."""
    act = ops.ACTIVATIONS
    return {
        "add": lambda x, other, alpha=1: x + alpha * other if alpha != 1 else x + other,
        "sub": lambda x, other, alpha=1: x - alpha * other if alpha != 1 else x - other,
        "mul": lambda x, other: x * other,
        "div": lambda x, other: x / other,
        "matmul": jnp.matmul,
        "flatten": _flatten,
        "reshape": lambda x, *shape: x.reshape(_shape(shape)),
        "mean": _reduce(jnp.mean),
        "sum": _reduce(jnp.sum),
        "amax": lambda x, dim=(), keepdim=False: jnp.max(
            x, axis=_axes(dim) or None, keepdims=keepdim
        ),
        "transpose": lambda x, d0, d1: jnp.swapaxes(x, d0, d1),
        "permute": lambda x, *dims: jnp.transpose(x, _shape(dims)),
        "unsqueeze": lambda x, dim: jnp.expand_dims(x, dim),
        "squeeze": _squeeze,
        "relu": lambda x, inplace=False: act["relu"](x),
        "sigmoid": act["sigmoid"],
        "tanh": act["tanh"],
        "exp": jnp.exp,
        "softmax": _softmax_fn("softmax"),
        "log_softmax": _softmax_fn("log_softmax"),
    }


# In-place tensor methods (``y = y.add_(x)``) compute what their out-of-place twins do;
# `_check_inplace` refuses those whose mutation is read through another name.
_INPLACE = ("add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "exp")


def _methods() -> dict[str, Callable]:
    """Tensor method name (``call_method``) -> its JAX twin."""
    common = _common()
    return {
        **common,
        **{f"{name}_": common[name] for name in _INPLACE},
        "view": lambda x, *shape: x.reshape(_shape(shape)),
        "size": _size,
        "dim": lambda x: x.ndim,
        "contiguous": lambda x, *a, **k: x,
        "clone": lambda x, *a, **k: x,
        "detach": jax.lax.stop_gradient,
    }


def _functions(torch: Any, ctx_dropout: Callable) -> dict[Any, Callable]:
    """``call_function`` target -> its JAX twin (``ctx_dropout`` builds the dropout)."""
    F = torch.nn.functional
    act = ops.ACTIVATIONS
    common = _common()
    table: dict[Any, Callable] = {getattr(torch, name): f for name, f in common.items()}
    table.update({getattr(torch, f"{n}_"): common[n] for n in _INPLACE if hasattr(torch, f"{n}_")})
    table.update(
        {
            operator.add: operator.add,
            operator.sub: operator.sub,
            operator.mul: operator.mul,
            operator.truediv: operator.truediv,
            operator.neg: operator.neg,
            operator.matmul: jnp.matmul,
            operator.getitem: operator.getitem,
            getattr: getattr,
            torch.cat: _cat,
            torch.concat: _cat,
            torch.stack: lambda ts, dim=0: jnp.stack(list(ts), axis=dim),
            F.relu: lambda x, inplace=False: act["relu"](x),
            F.gelu: lambda x, approximate="none": act[
                "gelu_tanh" if approximate == "tanh" else "gelu"
            ](x),
            F.silu: lambda x, inplace=False: act["silu"](x),
            F.sigmoid: act["sigmoid"],
            F.tanh: act["tanh"],
            F.relu6: lambda x, inplace=False: act["relu6"](x),
            F.leaky_relu: lambda x, negative_slope=0.01, inplace=False: act["leaky_relu"](
                x, negative_slope
            ),
            F.elu: lambda x, alpha=1.0, inplace=False: act["elu"](x, alpha),
            F.softplus: ops.softplus,
            F.softmax: _softmax_fn("softmax"),
            F.log_softmax: _softmax_fn("log_softmax"),
            F.adaptive_avg_pool1d: _adaptive,
            F.adaptive_avg_pool2d: _adaptive,
            F.avg_pool1d: _pool_fn("avg"),
            F.avg_pool2d: _pool_fn("avg"),
            F.max_pool1d: _pool_fn("max"),
            F.max_pool2d: _pool_fn("max"),
            F.dropout: ctx_dropout,
            F.linear: lambda x, weight, bias=None: ops.linear(x, weight, bias),
            F.conv1d: _conv_fn,
            F.conv2d: _conv_fn,
        }
    )
    return table


# ---------------------------------------------------------------------------- the graph


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _source(node: Any) -> str:
    """``file:line (function): code`` of the user's line that made ``node``."""
    for path, line, func, code in _FRAME.findall(node.stack_trace or ""):
        if "/torch/" not in path.replace("\\", "/"):
            return f"{path}:{line} (in {func}): {code.strip()}"
    return "source line unknown"


def _function_name(torch: Any, target: Any) -> str:
    """``torch.sort``, ``torch.nn.functional.relu``, ``operator.add``, or its qualified name."""
    name = getattr(target, "__name__", None) or repr(target)
    for prefix, namespace in (
        ("torch.", torch),
        ("torch.nn.functional.", torch.nn.functional),
        ("operator.", operator),
    ):
        if getattr(namespace, name, None) is target:
            return prefix + name
    mod = getattr(target, "__module__", None)
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def _describe(node: Any, modules: dict[str, Any]) -> str:
    if node.op == "call_module":
        what = f"{node.target}: {type(modules[node.target]).__name__}"
    elif node.op == "call_function":
        what = _function_name(require_torch(), node.target)
    else:
        what = str(node.target)
    return f"node '{node.name}' ({node.op} {what}) at {_source(node)}"


def _node_error(node: Any, modules: dict[str, Any], why: str, fix: str) -> ValueError:
    return ValueError(f"cannot convert {_describe(node, modules)}: {why}. Fix: {fix}")


@dataclasses.dataclass(frozen=True)
class _Graph:
    """The traced graph and the tables that run it."""

    graph_module: Any
    modules: dict[str, Any]
    handlers: dict[type, Callable[..., Any]]
    methods: dict[str, Callable]
    torch: Any

    def run(
        self, params: Params, model_state: Any, x: Any, *, train: bool, rng: Any
    ) -> tuple[Any, Any]:
        """Replays the graph on JAX arrays; see `FxConverted.fn`."""
        ctx = _Ctx(params, {k: dict(v) for k, v in model_state.items()}, train, rng)
        functions = _functions(self.torch, _dropout_fn(ctx))
        env: dict[Any, Any] = {}
        inputs = 0
        for i, node in enumerate(self.graph_module.graph.nodes):
            ctx.node_index = i
            args = self.torch.fx.node.map_arg(node.args, env.__getitem__)
            kwargs = self.torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            try:
                if node.op == "placeholder":
                    if inputs:
                        raise _Unsupported(
                            "a second input of forward", "give forward one tensor input."
                        )
                    env[node], inputs = x, 1
                elif node.op == "output":
                    return args[0], ctx.state
                else:
                    env[node] = self._call(node, args, kwargs, ctx, functions)
            except _Unsupported as e:
                raise _node_error(node, self.modules, e.why, e.fix) from None
        raise AssertionError("a traced graph ends with an output node")  # pragma: no cover

    def _call(self, node: Any, args: tuple, kwargs: dict, ctx: _Ctx, functions: dict) -> Any:
        if node.op == "get_attr":
            path, _, name = node.target.rpartition(".")
            if name in ctx.params.get(path, {}):
                return ctx.params[path][name]
            if name in ctx.state.get(path, {}):
                return ctx.state[path][name]
            value = _attribute(self.graph_module, node.target)
            if hasattr(value, "detach"):  # a plain tensor attribute: a constant
                return jnp.asarray(value.detach().cpu().numpy())
            raise _Unsupported(
                f"the attribute {node.target!r} is a {type(value).__name__}, neither a "
                "parameter, a buffer nor a tensor",
                "make it an nn.Parameter or a buffer (self.register_buffer(name, tensor)).",
            )
        if node.op == "call_module":
            module = self.modules[node.target]
            handler = next(
                (h for t, h in self.handlers.items() if type(module) is t), None
            ) or next((h for t, h in self.handlers.items() if isinstance(module, t)), None)
            if handler is None:
                raise _Unsupported(
                    f"{type(module).__name__} is not supported",
                    f"replace it by supported layers ({supported_text(self.torch)}).",
                )
            return handler(module, ctx.params.get(node.target, {}), *args, ctx, node.target)
        if node.op == "call_method":
            method = self.methods.get(node.target)
            if method is None:
                raise _Unsupported(
                    f"the tensor method .{node.target}() is not supported",
                    f"use one of: {', '.join(sorted(self.methods))}.",
                )
            return method(*args, **kwargs)
        fn = functions.get(node.target)
        if fn is None:
            raise _Unsupported(
                "this function is not supported",
                "rewrite it with supported operations (torch.flatten, torch.cat, +, -, *, /, "
                "@, mean, sum, view/reshape, permute/transpose, F.linear, F.conv1d/2d, and "
                "the functional activations, pooling and dropout).",
            )
        return fn(*args, **kwargs)


def _attribute(root: Any, target: str) -> Any:
    """``root.a.b.c`` for the ``get_attr`` target ``"a.b.c"``."""
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _inplace(torch: Any, node: Any, modules: dict[str, Any]) -> bool:
    """Whether ``node`` overwrites its first argument (``inplace=True``, ``relu_()``)."""
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op != "call_function":
        return False
    if getattr(node.target, "__name__", "").endswith("_"):  # torch.relu_ and the like
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature; not ours to judge
        return False
    return bound.arguments.get("inplace") is True


def _check_inplace(torch: Any, gm: Any, modules: dict[str, Any]) -> None:
    """Refuses an in-place operation whose input is read again afterwards.

    PyTorch overwrites the tensor, so a later read of the old name sees the new value;
    the traced graph (and so the JAX function, which has no mutation) reads the old one:
    ``act(y); return y + 1`` with ``ReLU(inplace=True)`` would silently differ.

    Raises:
        ValueError: naming the node, its source line and the fix.
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        if not _inplace(torch, node, modules):
            continue
        source = node.args[0]
        later = [u for u in source.users if u is not node and order[u] > order[node]]
        if later:
            raise _node_error(
                node,
                modules,
                f"it overwrites '{source.name}' in place, and '{later[0].name}' reads "
                f"'{source.name}' afterwards: PyTorch sees the overwritten value there, "
                "the converted function (which has no mutation) would see the old one",
                "assign the result (y = act(y), y = y.relu_()) or use inplace=False",
            )


def supported_text(torch: Any) -> str:
    """The layer types the fx conversion knows, comma-separated."""
    return ", ".join(t.__name__ for t in _module_handlers(torch.nn))


@dataclasses.dataclass(frozen=True)
class FxConverted:
    """A PyTorch module converted through ``torch.fx``: a pure function and its parameters.

    Attributes:
        params: ``{module path: {parameter name: array}}``, PyTorch's names and layouts
            (``params["fc"]["weight"]`` is ``[out, in]``).
        model_state: the buffers, ``{module path: {buffer name: array}}`` (BatchNorm's
            ``running_mean``, ``running_var``, ``num_batches_tracked``).
        input_shape: the PyTorch shape of one example.
        input_dtype: the dtype of the example checked at conversion.
        keys: state-dict key -> ``("params" or "model_state", module path, name)``.
        layout: state-dict key -> ``(shape, torch dtype)`` of the original module.

    Example:
        >>> import numpy as np, torch
        >>> class Residual(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(3, 3)
        ...     def forward(self, x):
        ...         return x + torch.relu(self.fc(x))
        >>> net = Residual()
        >>> conv = from_torch_fx(net, (3,))
        >>> conv.params["fc"]["weight"].shape  # PyTorch's [out, in]
        (3, 3)
        >>> x = np.ones((2, 3), np.float32)  # [B, F]
        >>> bool(np.allclose(conv.apply(conv.params, x), net(torch.from_numpy(x)).detach()))
        True
    """

    params: Params
    model_state: dict[str, dict[str, jax.Array]]
    input_shape: tuple[int, ...]
    input_dtype: Any
    keys: dict[str, tuple[str, str, str]]
    layout: dict[str, tuple[tuple[int, ...], Any]] = dataclasses.field(repr=False)
    graph: _Graph = dataclasses.field(repr=False)

    def fn(
        self, params: Params, model_state: Any, x: Any, *, train: bool = False, rng: Any = None
    ) -> tuple[Any, Any]:
        """The model as a pure function, in PyTorch's layout.

        Args:
            params: like `params`.
            model_state: like `model_state`.
            x: ``[B, *input_shape]`` (NCHW images, ``[B, T]`` token ids, ...).
            train: ``model.train()`` (True) or ``model.eval()`` (False).
            rng: a JAX key for dropout in training (each dropout node folds in its index).

        Returns:
            ``(output, new_model_state)``: the running statistics updated in training.
        """
        return self.graph.run(params, model_state, x, train=train, rng=rng)

    def apply(
        self,
        params: Params,
        x: Any,
        *,
        model_state: Any = None,
        train: bool = False,
        rng: Any = None,
    ) -> Any:
        """The output alone, on a PyTorch-layout input (``model_state`` default: `model_state`)."""
        state = self.model_state if model_state is None else model_state
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        return self.fn(params, state, jnp.asarray(x), train=train, rng=rng)[0]

    def model(self, channels_last: bool = True) -> Model:
        """A jaxtrain `Model` whose ``init`` returns copies of the converted weights.

        Args:
            channels_last: take jaxtrain's NHWC images (``[B, H, W, C]``) and transpose them
                to NCHW first (4-D inputs only; a 4-D output is transposed back). False:
                inputs in PyTorch's layout.
        """

        def init(rng: Any, x: Any) -> tuple[Any, Any]:
            del rng, x  # the converted weights are the initial ones
            return jax.tree.map(jnp.array, (self.params, self.model_state))

        def apply(params, model_state, x, *, train=False, rng=None):
            if channels_last and x.ndim == 4:
                x = jnp.transpose(x, (0, 3, 1, 2))
            y, new = self.fn(params, model_state, x, train=train, rng=rng)
            if channels_last and getattr(y, "ndim", 0) == 4:
                y = jnp.transpose(y, (0, 2, 3, 1))
            return y, (new if train else model_state)

        return Model(init, apply, name=type(self.graph.graph_module).__name__)

    def params_from(self, torch_model: Any) -> Params:
        """The current parameters of ``torch_model`` (same architecture)."""
        return _collect(torch_model.named_parameters())

    def state_from(self, torch_model: Any) -> dict[str, dict[str, jax.Array]]:
        """The current buffers of ``torch_model`` (same architecture)."""
        return _collect(torch_model.named_buffers())

    def state_dict(self, params: Params, model_state: Any = None) -> dict[str, Any]:
        """``params`` (+ ``model_state``) as a PyTorch state dict of the original module.

        Every key of the original ``state_dict()`` is filled, with the original dtypes; the
        values are copies (bitwise for float32 and float64 weights).

        Raises:
            ValueError: a key with no value (a buffer while ``model_state`` is None and the
                model has buffers).
        """
        state = self.model_state if model_state is None else model_state
        trees = {"params": params, "model_state": state}
        return tensors_for(self.keys, trees, self.layout)

    def load_into(self, torch_model: Any, params: Params, model_state: Any = None) -> None:
        """Copies ``params`` (and ``model_state``) into ``torch_model`` (strict)."""
        torch_model.load_state_dict(self.state_dict(params, model_state))


def _collect(named: Any) -> dict[str, dict[str, jax.Array]]:
    out: dict[str, dict[str, jax.Array]] = {}
    for full, tensor in named:
        path, _, name = full.rpartition(".")
        out.setdefault(path, {})[name] = jnp.asarray(tensor.detach().cpu().numpy().copy())
    return out


def _trace(torch: Any, torch_model: Any) -> Any:
    tracer = torch.fx.Tracer()
    tracer.record_stack_traces = True  # node.stack_trace: the source line for errors
    try:
        graph = tracer.trace(torch_model)
    except Exception as e:
        raise ValueError(
            f"torch.fx.symbolic_trace cannot trace {type(torch_model).__name__}: "
            f"{type(e).__name__}: {e}. Fix: make forward traceable (no Python control flow "
            "on tensor values), or write the model as nn.Sequential."
        ) from e
    return torch.fx.GraphModule(tracer.root, graph)


def _keys(torch_model: Any) -> dict[str, tuple[str, str, str]]:
    """State-dict key -> where its value lives (tied weights point at one place)."""
    where: dict[int, tuple[str, str, str]] = {}
    for full, t in torch_model.named_parameters():
        path, _, name = full.rpartition(".")
        where[id(t)] = ("params", path, name)
    for full, t in torch_model.named_buffers():
        path, _, name = full.rpartition(".")
        where.setdefault(id(t), ("model_state", path, name))
    sd = torch_model.state_dict(keep_vars=True)
    return {k: where[id(v)] for k, v in sd.items() if id(v) in where}


def _input_dtype(torch: Any, gm: Any, torch_model: Any) -> Any:
    """int32 when the input goes straight into an Embedding; else the parameters' dtype."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for user in node.users:
                if user.op == "call_module" and isinstance(
                    modules[user.target], torch.nn.Embedding
                ):
                    return np.dtype("int32")
            break
    floats = [p for p in torch_model.parameters() if p.is_floating_point()]
    return np.dtype(str(floats[0].dtype).removeprefix("torch.")) if floats else np.float32


def check_x64(dtype: Any, what: str) -> None:
    """Refuses float64 weights while JAX's x64 mode is off (they would become float32).

    Raises:
        ValueError: naming the fix.
    """
    x64 = jax.dtypes.canonicalize_dtype(np.float64) == np.float64  # also inside enable_x64
    if np.dtype(dtype) == np.float64 and not x64:
        raise ValueError(
            f"{what} is float64 (model.double()), but JAX's x64 mode is off, so JAX would "
            "silently compute in float32. Fix: jax.config.update('jax_enable_x64', True) "
            "(or `with jax.enable_x64(True):`) before converting, or convert model.float()."
        )


def from_torch_fx(torch_model: Any, input_shape: Any, *, input_dtype: Any = None) -> FxConverted:
    """Converts any module ``torch.fx.symbolic_trace`` can trace into a pure JAX function.

    Args:
        torch_model: an ``nn.Module`` (residual blocks, skip connections, ``torch.cat``,
            ``torch.flatten``, ``view``/``reshape``, ``mean``, ``+`` ... in ``forward``).
        input_shape: the PyTorch shape of one example, without the batch dimension.
        input_dtype: the input's dtype (default: int32 when the input feeds an
            ``Embedding``, else the dtype of the model's parameters).

    Returns:
        `FxConverted`; ``converted.apply(converted.params, x)`` equals ``torch_model(x)``
        in eval mode, and ``converted.fn(..., train=True, rng=key)`` in train mode
        (except for dropout's random mask).

    Raises:
        ValueError: the module cannot be traced, or a node is not supported (naming
            the node, its call and its source line), or float64 weights without x64.

    Example:
        >>> import jax, numpy as np, torch
        >>> class Block(torch.nn.Module):  # a skip connection around Linear + BatchNorm
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.bn = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)
        ...     def forward(self, x):
        ...         return torch.cat([x, torch.relu(self.bn(self.fc(x)))], dim=1)
        >>> conv = from_torch_fx(Block(), (4,))
        >>> sorted(conv.params), sorted(conv.model_state["bn"])
        (['bn', 'fc'], ['num_batches_tracked', 'running_mean', 'running_var'])
        >>> x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)  # [B, F]
        >>> y, state = conv.fn(conv.params, conv.model_state, x, train=True)  # model.train()
        >>> y.shape, int(state["bn"]["num_batches_tracked"])
        ((8, 8), 1)
    """
    torch = require_torch()
    gm = _trace(torch, torch_model)
    dtype = (
        np.dtype(input_dtype) if input_dtype is not None else _input_dtype(torch, gm, torch_model)
    )
    for p in torch_model.parameters():
        check_x64(str(p.dtype).removeprefix("torch."), f"parameter dtype {p.dtype}")
    _check_inplace(torch, gm, dict(gm.named_modules()))
    graph = _Graph(gm, dict(gm.named_modules()), _module_handlers(torch.nn), _methods(), torch)
    converted = FxConverted(
        params=_collect(torch_model.named_parameters()),
        model_state=_collect(torch_model.named_buffers()),
        input_shape=tuple(int(d) for d in input_shape),
        input_dtype=dtype,
        keys=_keys(torch_model),
        layout=layout_of(torch_model),
        graph=graph,
    )
    # Every node runs once, abstractly: unsupported nodes and settings fail here, by name.
    x = jax.ShapeDtypeStruct((2, *converted.input_shape), dtype)
    for train in (False, True):
        try:
            jax.eval_shape(
                lambda p, s, x, train=train: converted.fn(
                    p, s, x, train=train, rng=jax.random.key(0)
                ),
                converted.params,
                converted.model_state,
                x,
            )
        except ValueError as e:
            raise ValueError(str(e)) from None  # without JAX's traceback notes
    return converted
