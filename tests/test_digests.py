"""jaxtrain.digests: the claim that changing any single word of an array changes its
digest, checked at random positions over the dtypes a TrainState holds (float32,
bfloat16, float16, int8, uint8, uint32 key data, bool), scalars, NaN payloads and the
sign of zero; and that a zero-size array has a digest."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxtrain.digests import device_digests, to_hex

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _variants(rng, dtype, shape, n):
    """A random array and ``n`` copies, each with one element's bits changed."""
    size = int(np.prod(shape))
    if dtype == np.bool_:
        base = rng.integers(0, 2, shape).astype(bool)
    else:
        raw = rng.integers(0, 256, size * np.dtype(dtype).itemsize, dtype=np.uint8)
        base = raw.view(dtype).reshape(shape)
    out = []
    for _ in range(n):
        changed = base.copy().reshape(-1)
        i = int(rng.integers(size))
        if dtype == np.bool_:
            changed[i] = not changed[i]
        else:
            bits = changed.view(UINT[np.dtype(dtype).itemsize])
            flip = int(rng.integers(1, 2 ** (8 * bits.itemsize)))  # never 0: a change
            bits[i] ^= flip
        out.append(changed.reshape(shape))
    return base, out


def test_any_single_changed_word_changes_the_digest():
    rng = np.random.default_rng(0)
    cases = []
    for dtype in (np.float32, ml_dtypes.bfloat16, np.float16, np.int8, np.uint8, np.uint32):
        for shape in ((), (3, 7)):
            cases.append(_variants(rng, dtype, shape, 3))
    cases.append(_variants(rng, np.bool_, (9,), 3))
    key_data = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), 4)))
    cases.append((key_data, _variants(rng, np.uint32, key_data.shape, 3)[1]))
    arrays = [a for base, changed in cases for a in (base, *changed)]
    for a in arrays:  # the device copy keeps every bit (NaN payloads included)
        assert np.asarray(jnp.asarray(a)).tobytes() == a.tobytes()
    digests = to_hex(device_digests([jnp.asarray(a) for a in arrays]))
    i = 0
    for base, changed in cases:
        group = digests[i : i + 1 + len(changed)]
        i += 1 + len(changed)
        assert group[0] not in group[1:], (base.dtype, base.shape)


def test_nan_payloads_signed_zeros_and_empty_arrays():
    words = [0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800001, 0x00000000, 0x80000000]
    f32 = [np.array([1, v, 3], np.uint32).view(np.float32) for v in words]
    half = [0x7FC0, 0x7FC1, 0xFFC0, 0x7F81, 0x0000, 0x8000]  # the same for bfloat16
    bf16 = [np.array([1, v, 3], np.uint16).view(ml_dtypes.bfloat16) for v in half]
    scalars = [np.float32(0.0), np.float32(-0.0)]
    empty = [np.zeros((0,), np.float32), np.zeros((0, 3), np.int8), np.zeros((0,), bool)]
    digests = to_hex(device_digests([jnp.asarray(a) for a in f32 + bf16 + scalars + empty]))
    assert len(set(digests[:6])) == 6 and len(set(digests[6:12])) == 6
    assert digests[12] != digests[13]  # 0.0 and -0.0
    assert all(len(d) == 16 for d in digests[14:])
