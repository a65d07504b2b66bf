"""Metrics that accumulate on the device as (weighted sum, weight) pairs.

Averages of averages are wrong when batches hold different numbers of real examples
(the padded last batch). Keeping the sum and the weight separately makes merging exact:
the mean over a whole data set is ``sum(totals) / sum(weights)``, whatever the batching.

What must not live here: per-batch losses (`jaxtrain.losses`) and log records
(`jaxtrain.train_log`). It never imports the loop, the applications (`jaxtrain.apps`,
`jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.losses import INVALID_COUNT_KEYS, INVALID_LABELS, broadcast_mask

# A metric accumulator: {name: (total, weight)} with float32 scalar leaves.
Sums = dict[str, tuple[jax.Array, jax.Array]]


def sums_from_values(values: Mapping[str, jax.Array], mask: jax.Array | None) -> Sums:
    """Turns per-example (or per-token) values into weighted sums.

    Args:
        values: name -> array ``[B, ...]`` of per-example values, or a scalar that
            is already a mean over the batch (weighted then by the real-example count).
        mask: ``[B]`` weights (1 real, 0 padding) or None.

    Returns:
        name -> (total, weight), float32 scalars.

    Example:
        >>> import jax.numpy as jnp
        >>> mask = jnp.array([1.0, 1.0, 0.0])  # the third example is padding
        >>> sums = sums_from_values({"loss": jnp.array([1.0, 3.0, 9.0])}, mask)
        >>> [float(x) for x in sums["loss"]]  # (total, weight): the padded 9.0 does not count
        [4.0, 2.0]
    """
    out = {}
    for name, v in values.items():
        v = jnp.asarray(v, jnp.float32)
        if name in INVALID_COUNT_KEYS:
            # Counts of invalid labels / mask values (jaxtrain.apps.tasks.classification_eval):
            # summed unweighted, so a bad mask cannot weight its own error away.
            out[name] = (jnp.sum(v), jnp.float32(1))
        elif v.ndim == 0:
            w = jnp.sum(jnp.asarray(mask, jnp.float32)) if mask is not None else jnp.float32(1)
            out[name] = (v * w, w)
        else:
            w = broadcast_mask(mask, v.shape)
            # where: a NaN in a padded row must not leak into the sum (NaN * 0 is NaN).
            out[name] = (jnp.sum(jnp.where(w > 0, v * w, 0.0)), jnp.sum(w))
    return out


def zeros_like_sums(sums: Sums) -> Sums:
    """An empty accumulator with the same names.

    Args:
        sums: an accumulator ``{name: (total, weight)}``.

    Returns:
        The same structure with every scalar 0 (the start of a `merge` over batches).

    Example:
        >>> import jax.numpy as jnp
        >>> zeros_like_sums({"loss": (jnp.float32(4.0), jnp.float32(2.0))})["loss"][1].item()
        0.0
    """
    return jax.tree.map(jnp.zeros_like, sums)


def merge(a: Sums, b: Sums) -> Sums:
    """Adds two accumulators (pure; runs on the device).

    Args:
        a: an accumulator ``{name: (total, weight)}``.
        b: an accumulator with the same names.

    Returns:
        ``{name: (total_a + total_b, weight_a + weight_b)}``, float32 scalars.

    Example:
        >>> import jax.numpy as jnp
        >>> a = sums_from_values({"loss": jnp.array([1.0, 3.0])}, None)
        >>> b = sums_from_values({"loss": jnp.array([8.0])}, None)
        >>> compute(merge(a, b))  # the mean of 1, 3, 8, not the mean of the batch means
        {'loss': 4.0}
    """
    return jax.tree.map(jnp.add, a, b)


def compute(sums: Sums) -> dict[str, float]:
    """Reads an accumulator back to the host as ``{name: mean}``.

    This is a host sync: call it at logging or evaluation time, not every step.

    Args:
        sums: an accumulator ``{name: (total, weight)}`` of device scalars.

    Returns:
        ``{name: total / weight}`` as Python floats (NaN where the weight is 0). The
        counts ``invalid_labels`` / ``invalid_mask`` (from `jaxtrain.apps.tasks.classification_eval`)
        are left out when 0.

    Raises:
        ValueError: when such a count is > 0: the evaluated data held labels outside
            ``[0, C)`` (where the mask is > 0) or mask values outside ``[0, 1]``, and the
            other metrics are meaningless.

    Example:
        >>> import jax.numpy as jnp
        >>> compute({"accuracy": (jnp.float32(3.0), jnp.float32(4.0))})
        {'accuracy': 0.75}
    """
    host = jax.device_get(sums)
    for name in INVALID_COUNT_KEYS:
        if name in host and float(host[name][0]) > 0:
            what = (
                "label(s) outside [0, num_classes) where the mask is > 0"
                if name == INVALID_LABELS
                else "mask value(s) outside [0, 1]"
            )
            raise ValueError(
                f"evaluation: the data held {int(float(host[name][0]))} {what}, so its loss "
                "and accuracy are meaningless. Fix: remap the labels to [0, num_classes), "
                "set mask=0 at positions to ignore, and keep mask values in [0, 1]."
            )
    return {
        name: float(np.asarray(t) / np.asarray(w)) if float(w) > 0 else float("nan")
        for name, (t, w) in host.items()
        if name not in INVALID_COUNT_KEYS
    }
