"""Built-in Flax linen models: MLP, a small CNN, and the decoder-only transformer LM.

`TransformerLM` lives in `jaxtrain.models.lm` (fused attention, remat, scan over layers)
and is re-exported here, where it always was.

What must not live here: adapters (`jaxtrain.models.adapters`), losses, and the models'
PyTorch twins (`jaxtrain.contrast`). It never imports the loop, the applications
(`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxtrain.models.lm import TransformerLM  # noqa: F401  (its home before models.lm)

INITS = ("flax", "torch")

# PyTorch's default for nn.Linear and nn.Conv2d: kaiming_uniform_(a=sqrt(5)) on the weight,
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) — the same as variance_scaling(1/3, fan_in,
# uniform), whose bound is sqrt(3 * scale / fan_in). fan_in = in_features for a dense
# kernel [in, out], kh * kw * in_channels for a conv kernel [kh, kw, in, out].
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias initialiser for a layer with ``fan_in`` inputs.

    Args:
        fan_in: inputs per output unit (``in_features``, or ``kh * kw * in_channels``).

    Returns:
        An initialiser ``(key, shape, dtype) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """
    bound = fan_in**-0.5

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _layer_init(param_init: str, fan_in: int) -> dict:
    """Keyword arguments for ``nn.Dense`` / ``nn.Conv``: none for Flax's defaults."""
    if param_init == "flax":
        return {}
    if param_init == "torch":
        return {"kernel_init": torch_kernel_init, "bias_init": torch_bias_init(fan_in)}
    raise ValueError(
        f"param_init must be one of {', '.join(repr(i) for i in INITS)}; got {param_init!r}. "
        "Fix: param_init='flax' (lecun_normal kernels, zero biases) or param_init='torch' "
        "(PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases)."
    )


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    Attributes:
        hidden: widths of the hidden layers.
        num_outputs: width of the output layer (classes, or regression targets).
        dropout: dropout rate after each hidden layer (training only).
        param_init: ``"flax"`` (default: lecun-normal kernels, zero biases) or ``"torch"``
            (PyTorch's ``nn.Linear`` defaults: kernels and biases U(±1/sqrt(fan_in))).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> mlp = MLP(hidden=(16,), num_outputs=3)
        >>> x = jnp.zeros((2, 4, 4))  # [B, ...], flattened to [B, 16]
        >>> variables = jax.eval_shape(mlp.init, jax.random.key(0), x)  # shapes only
        >>> variables["params"]["Dense_0"]["kernel"].shape
        (16, 16)
        >>> jax.eval_shape(mlp.apply, variables, x).shape  # logits [B, num_outputs]
        (2, 3)
    """

    hidden: Sequence[int] = (128, 128)
    num_outputs: int = 10
    dropout: float = 0.0
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: ``[B, ...]`` -> logits ``[B, num_outputs]``."""
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, **_layer_init(self.param_init, x.shape[-1]))(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_outputs, **_layer_init(self.param_init, x.shape[-1]))(x)


class CNN(nn.Module):
    """A small VGG-style convolutional classifier (8x8 digits, 28x28 MNIST alike).

    For each width ``c`` in ``channels``: conv3x3(c) -> relu -> conv3x3(c) -> relu ->
    maxpool2. Then flatten -> dropout -> dense -> relu -> dropout -> dense(num_classes).
    On 8x8x1 digits with the defaults: 8x8x32 -> 4x4x32 -> 4x4x64 -> 2x2x64 -> 256 ->
    128 -> 10 (about 99k parameters).

    Attributes:
        channels: convolution widths, one block (two convs and a pool) each.
        dense: width of the hidden dense layer.
        num_classes: number of classes.
        dropout: dropout rate before each dense layer (training only).
        param_init: ``"flax"`` (default) or ``"torch"`` (PyTorch's ``nn.Conv2d`` /
            ``nn.Linear`` defaults: U(±1/sqrt(fan_in)), fan_in = 3 * 3 * in_channels for
            a conv).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cnn = CNN(channels=(4,), dense=8, num_classes=10)
        >>> x = jnp.zeros((2, 8, 8, 1))  # NHWC [B, H, W, C]
        >>> variables = jax.eval_shape(cnn.init, jax.random.key(0), x)  # shapes only
        >>> variables["params"]["Conv_0"]["kernel"].shape  # [kh, kw, in, out]
        (3, 3, 1, 4)
        >>> jax.eval_shape(cnn.apply, variables, x).shape  # logits [B, num_classes]
        (2, 10)
    """

    channels: Sequence[int] = (32, 64)
    dense: int = 128
    num_classes: int = 10
    dropout: float = 0.3
    param_init: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: ``[B, H, W, C]`` (NHWC) -> logits ``[B, num_classes]``."""
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), **_layer_init(self.param_init, 9 * x.shape[-1]))(x))
            x = nn.relu(nn.Conv(c, (3, 3), **_layer_init(self.param_init, 9 * x.shape[-1]))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))  # [B, H/2, W/2, c]
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.dense, **_layer_init(self.param_init, x.shape[-1]))(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, **_layer_init(self.param_init, x.shape[-1]))(x)
