"""Integrity digests of sharded arrays, computed where the shards live.

A checkpoint's arrays are checked against digests taken when they were saved. Hashing
bytes on the host (SHA-256) would need every byte of every array on one host; here the
digest of an array is a *sum over its elements* of a mixed 32-bit hash of (element bits,
global element position), computed twice with different mixes (64 bits per array).
Integer sums wrap modulo ``2**32`` and do not depend on the order of addition, so:

* each device hashes its own shard and XLA adds the partial sums (a tiny all-reduce):
  no device or host ever holds more than its own shard, and only 8 bytes per array
  come back to the host;
* the value does not depend on the sharding: a checkpoint saved on FSDP over 8 devices
  is verified after restoring onto 1 device or any other mesh;
* changing any single 32-bit word of an array always changes its digest (the mixing
  function is a bijection and the position enters every term); several changed words
  go unnoticed with probability about ``2**-64``.

Like SHA-256 it protects against accidental damage (flipped bits, truncated or swapped
files), not deliberate edits. What must not live here: the checkpoint format
(`jaxtrain.checkpoint`). It never imports the loop, the applications or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SALTS = (0x9E3779B9, 0x85EBCA77)  # one per 32-bit half of the digest


def _fmix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection on uint32 that mixes every bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (one per element; two for 8-byte dtypes)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 4:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
    raise TypeError(f"cannot digest arrays of dtype {x.dtype} (itemsize {size}).")


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major position (modulo 2**32), built from iotas (no copy)."""
    pos = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        pos = pos + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    return pos


def _leaf_digest(x: jax.Array) -> jax.Array:
    w = _words(jnp.asarray(x))
    pos = _positions(w.shape)
    a, b = (_fmix(_fmix(w + jnp.uint32(salt)) ^ _fmix(pos ^ jnp.uint32(salt))) for salt in _SALTS)
    # One variadic reduction for both halves: XLA fuses the element-wise hashing into
    # it, so no word-, position- or hash-sized temporary is ever materialised (two
    # separate sums would each need the shared words and positions in memory).
    zero = jnp.uint32(0)
    ha, hb = lax.reduce(
        (a, b), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]), tuple(range(w.ndim))
    )
    return jnp.stack([ha, hb])


@jax.jit
def _digests(leaves: list[Any]) -> list[jax.Array]:
    return [_leaf_digest(x) for x in leaves]


def device_digests(leaves: Sequence[Any]) -> list[jax.Array]:
    """Starts computing the digest of every array, on the devices that hold it.

    Asynchronous, like any jax computation: it returns at once, and reading the result
    (`to_hex`) waits for it. Every process of a multi-process run must call it with its
    part of the same global arrays, as for any jitted computation.

    Args:
        leaves: arrays of any shape, dtype and sharding (``jax.Array`` or numpy).

    Returns:
        One ``uint32[2]`` array per leaf, replicated.

    Example:
        >>> import jax.numpy as jnp
        >>> a, b = to_hex(device_digests([jnp.arange(4.0), jnp.arange(4.0).at[3].set(5.0)]))
        >>> len(a), a == b
        (16, False)
    """
    return _digests(list(leaves))


def to_hex(digests: Sequence[jax.Array]) -> list[str]:
    """The digests of `device_digests` as 16-digit hex strings (waits for them).

    Reads one local copy of each replicated result, so it also works in a
    multi-process run (and in a background thread).

    Args:
        digests: `device_digests`' result.

    Returns:
        One hex string per leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> to_hex(device_digests([jnp.zeros(3)])) == to_hex(device_digests([jnp.zeros(3)]))
        True
    """
    out = []
    for d in digests:
        local = d.addressable_data(0) if isinstance(d, jax.Array) else d
        hi, lo = (int(v) for v in np.asarray(local))
        out.append(f"{hi:08x}{lo:08x}")
    return out
