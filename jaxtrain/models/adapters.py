"""Every kind of model meets at one pure apply.

A `Model` is a pair of pure functions (like an optax transformation):

* ``init(rng, x) -> (params, model_state)``
* ``apply(params, model_state, x, *, train, rng) -> (y, new_model_state)``

Adapters turn a Flax linen module, a Flax NNX module or a plain function
``(params, x) -> y`` into this pair, so losses, steps and the loop never care which.

What must not live here: models themselves (`jaxtrain.models.builtin`) and losses
(`jaxtrain.apps.tasks`). It never imports the loop, the applications (`jaxtrain.apps`,
`jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib
from collections.abc import Callable
from typing import Any

import jax

from jaxtrain.types import PyTree


@dataclasses.dataclass(frozen=True)
class Model:
    """A model as two pure functions; holds no arrays.

    Attributes:
        init: ``init(rng, x) -> (params, model_state)``; ``x`` is a sample input batch.
        apply: ``apply(params, model_state, x, *, train=False, rng=None) ->
            (y, new_model_state)``. ``rng`` is a typed key for stochastic layers
            (dropout) when ``train`` is True.
        name: for messages and summaries.

    Example:
        >>> import jax.numpy as jnp
        >>> model = Model(
        ...     init=lambda rng, x: ({"w": jnp.ones((x.shape[-1], 2))}, {}),
        ...     apply=lambda params, state, x, *, train=False, rng=None: (x @ params["w"], state),
        ... )
        >>> params, model_state = model.init(None, jnp.ones((4, 3)))
        >>> y, model_state = model.apply(params, model_state, jnp.ones((4, 3)))
        >>> y.shape
        (4, 2)
    """

    init: Callable[..., tuple[PyTree, PyTree]]
    apply: Callable[..., tuple[jax.Array, PyTree]]
    name: str = "model"


class _InputSpec:
    """Remembers the per-example input shape and dtype kind seen by ``init``.

    ``apply`` compares against it at trace time (shapes are static there), so feeding
    a model inputs of another rank, shape or kind fails with a message naming both,
    instead of a shape error deep inside a layer — or a silent dtype promotion.
    """

    def __init__(self, name: str):
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.kind: str | None = None

    def record(self, x: Any) -> None:
        if hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) >= 1:
            self.shape, self.kind = tuple(x.shape[1:]), x.dtype.kind

    def check(self, x: Any) -> None:
        if self.shape is None or self.kind is None or not hasattr(x, "shape"):
            return
        # Token ids ([B, T] ints) may be shorter than at init; other inputs must match.
        if len(x.shape) - 1 != len(self.shape) or (
            x.dtype.kind not in "iu" and tuple(x.shape[1:]) != self.shape
        ):
            raise ValueError(
                f"{self.name} was initialised with inputs of shape [batch, "
                f"{', '.join(map(str, self.shape))}] but got shape {list(x.shape)}. Fix: "
                "give inputs of the shape used at init (check the batch's 'x' layout: NHWC "
                "images, flattened features, token ids)."
            )
        if (x.dtype.kind in "iu") != (self.kind in "iu"):
            raise TypeError(
                f"{self.name} was initialised with {'integer' if self.kind in 'iu' else 'float'} "
                f"inputs but got dtype {x.dtype}. Fix: cast the inputs (e.g. images to float32, "
                "token ids to int32)."
            )


def _takes_kwarg(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def from_linen(module: Any) -> Model:
    """Adapts a ``flax.linen.Module``.

    If the module's ``__call__`` takes ``train``, it is passed (``train=False`` at
    init). Collections other than ``params`` (e.g. ``batch_stats``) become the model
    state and are updated (``mutable``) in training.

    Args:
        module: a linen module instance.

    Returns:
        A `Model`.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = from_linen(nn.Dense(2))
        >>> params, model_state = model.init(jax.random.key(0), jnp.ones((4, 3)))
        >>> params["kernel"].shape, model_state
        ((3, 2), {})
        >>> model.apply(params, model_state, jnp.ones((4, 3)))[0].shape
        (4, 2)
    """
    from flax import linen as nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"from_linen expects a flax.linen.Module; got {type(module).__name__}.")
    takes_train = _takes_kwarg(module.__call__, "train")

    def _kwargs(train: bool) -> dict:
        return {"train": train} if takes_train else {}

    spec = _InputSpec(type(module).__name__)

    def init(rng, x):
        spec.record(x)
        variables = dict(module.init({"params": rng, "dropout": rng}, x, **_kwargs(False)))
        params = variables.pop("params", {})
        return params, variables

    def apply(params, model_state, x, *, train=False, rng=None):
        spec.check(x)
        variables = {"params": params, **model_state}
        rngs = {"dropout": rng} if rng is not None else None
        if train and model_state:
            y, updates = module.apply(
                variables, x, rngs=rngs, mutable=list(model_state), **_kwargs(True)
            )
            return y, {**model_state, **updates}
        return module.apply(variables, x, rngs=rngs, **_kwargs(train)), model_state

    return Model(init, apply, name=type(module).__name__)


def from_nnx(module: Any) -> Model:
    """Adapts a ``flax.nnx.Module`` with ``nnx.split`` / ``nnx.merge``.

    ``nnx.Param`` variables are the parameters; every other variable (BatchNorm
    statistics, RNG stream counters) is the model state. ``init`` returns copies of the
    module's current values (NNX initialises at construction, so its ``rng`` is
    unused), new arrays on every call: a donating train step never deletes the
    module's own arrays, and two states built from one ``init`` stay independent.

    In training the module is switched to ``.train()`` mode and every RNG stream it
    holds is reseeded from the step's key (``dropout``, or ``default`` without one, with
    the key itself, like `from_linen`; any other stream with ``fold_in(key,
    crc32(name))``), so dropout and
    any other randomness follow ``fold_in(state.rng, step)`` whatever ``nnx.Rngs`` the
    module was built with and whether or not the loss threads ``model_state``. Such a
    module needs ``rng`` in training: ``apply(..., train=True)`` without it is an error.

    Args:
        module: an NNX module instance (its current values are copied, not shared).

    Returns:
        A `Model`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> model = from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
        >>> params, model_state = model.init(jax.random.key(0), jnp.ones((4, 3)))
        >>> y, model_state = model.apply(params, model_state, jnp.ones((4, 3)))
        >>> y.shape
        (4, 2)
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TypeError(f"from_nnx expects a flax.nnx.Module; got {type(module).__name__}.")
    # Two filters give exactly three parts (the starred form types a variadic tuple).
    graphdef, params, *others = nnx.split(module, nnx.Param, ...)
    (rest,) = others
    # RNG stream variables carry their stream name as ``tag`` (paths need not say it).
    streams = sorted(
        {
            tag
            for _, v in nnx.to_flat_state(rest)
            if isinstance(v, nnx.RngKey) and isinstance(tag := getattr(v, "tag", None), str)
        }
    )
    name = type(module).__name__

    def init(rng, x):
        del rng, x  # NNX modules are initialised when constructed.
        # Copies: the step donates the state built from these, and the module (and any
        # other state built from the same init) must keep its arrays.
        return jax.tree.map(lambda a: a.copy(), (params, rest))

    # Fresh Variables on every call (copy=True): Variables coming in through jit's
    # arguments belong to an outer trace and must not be mutated inside value_and_grad.
    merge_kwargs = {"copy": True} if _takes_kwarg(nnx.merge, "copy") else {}

    def apply(params, model_state, x, *, train=False, rng=None):
        m = nnx.merge(graphdef, params, model_state, **merge_kwargs)
        m.train() if train else m.eval()
        if train and streams:
            if rng is None:
                raise ValueError(
                    f"{name} has RNG streams {streams} (dropout or other random layers) but "
                    "apply(..., train=True) got rng=None: its randomness would not follow "
                    "fold_in(state.rng, step). Fix: take `rng` in your loss_fn and pass it, "
                    "model.apply(params, model_state, x, train=True, rng=rng)."
                )
            nnx.reseed(m, policy="match_shape", **_stream_keys(rng, streams))
        y = m(x)
        _, _, new_state = nnx.split(m, nnx.Param, ...)
        return y, new_state

    return Model(init, apply, name=type(module).__name__)


def _stream_keys(rng: jax.Array, streams: list[str]) -> dict[str, jax.Array]:
    """One key per NNX RNG stream from the step's key.

    ``dropout`` gets the key itself (what `from_linen` passes as its ``dropout`` rng);
    so does ``default`` when there is no ``dropout`` stream (``nnx.Dropout`` draws from
    ``default`` when the module was built with ``nnx.Rngs(seed)``), so a module trains
    the same whichever of the two it was built with. Any other stream gets an
    independent ``fold_in(key, crc32(name))`` (stable across runs, unlike ``hash``).
    """
    main = "dropout" if "dropout" in streams else "default"
    return {
        s: rng if s == main else jax.random.fold_in(rng, zlib.crc32(s.encode()) & 0x7FFFFFFF)
        for s in streams
    }


def from_function(
    fn: Callable[[PyTree, jax.Array], jax.Array],
    init_fn: Callable[[jax.Array, jax.Array], PyTree] | None = None,
    name: str | None = None,
) -> Model:
    """Adapts a plain function ``fn(params, x) -> y``.

    Args:
        fn: the forward pass.
        init_fn: ``init_fn(rng, x) -> params``; without it, call
            ``TrainState.create`` with your own params and never ``model.init``.
        name: for messages.

    Returns:
        A `Model` with an empty model state.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = from_function(
        ...     lambda p, x: x @ p["w"],
        ...     init_fn=lambda rng, x: {"w": jax.random.normal(rng, (x.shape[-1], 2))},
        ... )
        >>> params, model_state = model.init(jax.random.key(0), jnp.ones((4, 3)))
        >>> params["w"].shape, model_state
        ((3, 2), {})
        >>> model.apply(params, model_state, jnp.ones((4, 3)))[0].shape
        (4, 2)
    """
    if not callable(fn):
        raise TypeError(f"from_function expects a callable (params, x) -> y; got {fn!r}.")

    spec = _InputSpec(name or str(getattr(fn, "__name__", "model")))

    def init(rng, x):
        spec.record(x)
        if init_fn is None:
            raise ValueError(
                f"{name or getattr(fn, '__name__', 'model')} has no init_fn: pass "
                "from_function(fn, init_fn=...) or build the params yourself."
            )
        return init_fn(rng, x), {}

    def apply(params, model_state, x, *, train=False, rng=None):
        del train, rng
        spec.check(x)
        return fn(params, x), model_state

    return Model(init, apply, name=name or str(getattr(fn, "__name__", "function")))
