"""JAX parameters back to a PyTorch ``state_dict``: the way back after training in jaxtrain.

Both conversions (`jaxtrain.contrast.from_torch` for ``nn.Sequential``,
`jaxtrain.contrast.from_torch_fx` for any traceable module) remember the original
module's state-dict keys, shapes and dtypes. ``converted.state_dict(params, model_state)``
fills every one of those keys from the JAX trees (undoing the layout changes of the
``nn.Sequential`` conversion), so ``torch_model.load_state_dict(...)`` (strict) accepts it
and the model evaluates in PyTorch what was trained in JAX. Round trip: the weights come
back bitwise.

A key with no value, or a value of the wrong shape, is an error: a state dict that
silently kept some of the old weights would be a wrong model that loads without complaint.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from jaxtrain.contrast._torch import require_torch


def layout_of(torch_model: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{state-dict key: (shape, torch dtype)}`` of ``torch_model`` (metadata only).

    Args:
        torch_model: a ``torch.nn.Module``; its ``state_dict()`` is read, nothing kept.

    Returns:
        Every state-dict key (parameters and persistent buffers, e.g. BatchNorm's
        ``running_mean``) in the module's order, mapped to its shape in PyTorch's layout
        (``[out, in]``, OIHW) and its torch dtype: what `to_tensors` rebuilds.

    Example:
        >>> import torch
        >>> layout_of(torch.nn.BatchNorm1d(3))["num_batches_tracked"]
        ((), torch.int64)
    """
    return {k: (tuple(v.shape), v.dtype) for k, v in torch_model.state_dict().items()}


def to_tensors(
    values: dict[str, Any], layout: dict[str, tuple[tuple[int, ...], Any]]
) -> OrderedDict[str, Any]:
    """``{key: array}`` as the PyTorch state dict of the module ``layout`` describes.

    Args:
        values: state-dict key -> numpy/JAX array (PyTorch layout already).
        layout: `layout_of` the original module.

    Returns:
        ``OrderedDict`` of CPU tensors, keys in the module's order, original dtypes.

    Raises:
        ValueError: a key of the module without a value, or a value of the wrong shape.

    Example:
        >>> import numpy as np, torch
        >>> layout = layout_of(torch.nn.Linear(2, 1))
        >>> sd = to_tensors({"weight": np.ones((1, 2)), "bias": np.zeros(1)}, layout)
        >>> sd["weight"].dtype, list(sd)  # the module's dtype and key order
        (torch.float32, ['weight', 'bias'])
    """
    torch = require_torch()
    missing = [k for k in layout if k not in values]
    if missing:
        raise ValueError(
            f"no value for the state-dict keys {missing}: the state dict would be incomplete. "
            "Fix: pass the model_state (BatchNorm running statistics) along with the params, "
            "and params of the converted model's tree."
        )
    out: OrderedDict[str, Any] = OrderedDict()
    for key, (shape, dtype) in layout.items():
        arr = np.array(values[key])  # a writable host copy
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"state-dict key '{key}': value of shape {list(arr.shape)}, the module's is "
                f"{list(shape)}. Fix: pass params of the converted model (same architecture)."
            )
        out[key] = torch.from_numpy(arr).to(dtype)
    return out


def tensors_for(
    keys: dict[str, tuple[str, str, str]],
    trees: dict[str, Any],
    layout: dict[str, tuple[tuple[int, ...], Any]],
) -> OrderedDict[str, Any]:
    """The state dict of an fx conversion: ``keys[k] = (tree, module path, name)``."""
    values = {}
    for key, (tree, path, name) in keys.items():
        leaf = (trees.get(tree) or {}).get(path, {}).get(name)
        if leaf is not None:
            values[key] = leaf
    return to_tensors(values, layout)
