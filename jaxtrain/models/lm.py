"""The built-in decoder-only transformer LM: fused causal attention, remat, scan over layers.

`TransformerLM` is a GPT-style pre-LayerNorm decoder. What it does for the chip:

* **Attention** is `jax.nn.dot_product_attention` with ``is_causal=True``: no
  ``[B, 1, T, T]`` mask is built. ``attention="auto"`` (the default) picks cuDNN's fused
  flash attention on NVIDIA GPUs when the inputs are bfloat16/float16 and the head width
  fits cuDNN (a multiple of 8, at most 128), and XLA's attention everywhere else (CPU,
  TPU, float32); ``"xla"`` and ``"cudnn"`` force one (``"cudnn"`` raises where cuDNN
  cannot run). `attention_implementation` says which one ``"auto"`` picks.
* **Rematerialisation** (``remat=``, a name from `REMAT_POLICIES`): each block runs under
  ``jax.checkpoint`` with that JAX policy, so the backward pass recomputes what the policy
  does not save instead of keeping it in memory.
* **Scan over layers** (``scan_layers=True``): the blocks are one ``nn.scan`` over
  stacked parameters, so the compiled program, and its compile time, do not grow with
  depth. The scanned parameter tree holds ``params["layers"]`` with a leading
  ``[num_layers]`` axis; `stack_layers` / `unstack_layers` convert between the two trees.
* **bfloat16** comes from jaxtrain's precision policy (``make_train_step(...,
  precision="bfloat16")``): the step casts the float32 parameters to bfloat16 and every
  layer computes in its inputs' dtype; attention logits and softmax stay float32.

`gpt2_small` is the GPT-2-small-sized preset (12 layers, d_model 768, 12 heads, vocabulary
50,304, context 1,024, tied embeddings: 124,475,904 parameters).

The unrolled parameter tree (``scan_layers=False``, the default) is the one of the
earlier `nn.MultiHeadDotProductAttention`-based model, names, shapes and initial values
alike, so its checkpoints still restore.

What must not live here: the training loop, the precision policy (`jaxtrain.precision`),
the PyTorch twin (``benchmarks/gpu.py``). It never imports the loop, the applications or
torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "GPT2_SMALL",
    "REMAT_POLICIES",
    "TransformerLM",
    "attention_implementation",
    "causal_attention",
    "gpt2_small",
    "remat_policy",
    "stack_layers",
    "unstack_layers",
]

#: What ``TransformerLM(attention=...)`` accepts.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")

#: ``TransformerLM(remat=...)`` names: policies of ``jax.checkpoint_policies``, from the
#: least memory (recompute everything in the backward pass) to the most (save everything).
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_with_no_batch_dims_saveable",
    "dots_saveable",
    "everything_saveable",
)

#: GPT-2 small's shape (with its vocabulary padded from 50,257 to 50,304, a multiple of
#: 64, as nanoGPT does), as `TransformerLM` keyword arguments.
GPT2_SMALL: dict[str, Any] = {
    "vocab_size": 50304,
    "max_len": 1024,
    "d_model": 768,
    "num_heads": 12,
    "num_layers": 12,
    "tie_embeddings": True,
    "scan_layers": True,
}

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_BLOCK = re.compile(r"_Block_(\d+)")
_LAYERS = "layers"


def remat_policy(name: str | None) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy called ``name`` (None: no rematerialisation).

    Args:
        name: one of `REMAT_POLICIES`, or None.

    Returns:
        The policy function from ``jax.checkpoint_policies``, or None for None.

    Raises:
        ValueError: ``name`` is not one of `REMAT_POLICIES` (the message lists them).

    Example:
        >>> remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
        True
        >>> remat_policy(None) is None
        True
    """
    if name is None:
        return None
    if not isinstance(name, str) or name not in REMAT_POLICIES:
        raise ValueError(
            f"remat must be None or one of {', '.join(repr(p) for p in REMAT_POLICIES)}; got "
            f"{name!r}. Fix: remat='dots_saveable' (save matmul outputs, recompute the rest) "
            "or remat='nothing_saveable' (least memory), or remat=None (no recomputation)."
        )
    return getattr(jax.checkpoint_policies, name)


def _check_attention(name: str) -> None:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention must be one of {', '.join(repr(a) for a in ATTENTION_IMPLEMENTATIONS)}; "
            f"got {name!r}. Fix: attention='auto' (cuDNN flash attention on NVIDIA GPUs in "
            "bfloat16/float16, XLA elsewhere)."
        )


def attention_implementation(
    attention: str, dtype: Any, head_dim: int, backend: str | None = None
) -> str:
    """Which implementation ``attention`` resolves to: ``"xla"`` or ``"cudnn"``.

    ``"auto"`` is ``"cudnn"`` when the backend is a GPU, ``dtype`` is bfloat16 or float16
    and ``head_dim`` is a multiple of 8 no larger than 128 (what cuDNN's flash attention
    takes), else ``"xla"``. At trace time, ``"auto"`` also falls back to XLA when JAX
    cannot build the cuDNN call (e.g. a GPU without cuDNN, or ROCm).

    Args:
        attention: one of `ATTENTION_IMPLEMENTATIONS`.
        dtype: the dtype of queries, keys and values (the compute dtype).
        head_dim: ``d_model // num_heads``.
        backend: ``"cpu"``, ``"gpu"``, ``"tpu"``; default ``jax.default_backend()``.

    Returns:
        ``"xla"`` or ``"cudnn"``.

    Example:
        >>> attention_implementation("auto", jnp.bfloat16, 64, backend="gpu")
        'cudnn'
        >>> attention_implementation("auto", jnp.float32, 64, backend="gpu")
        'xla'
        >>> attention_implementation("auto", jnp.bfloat16, 64, backend="cpu")
        'xla'
    """
    _check_attention(attention)
    if attention != "auto":
        return attention
    backend = jax.default_backend() if backend is None else backend
    fits = jnp.dtype(dtype) in _HALF and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if backend == "gpu" and fits else "xla"


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, attention: str = "auto"
) -> jax.Array:
    """Causal multi-head attention, ``softmax(q k^T / sqrt(H) + causal) v``, fused.

    Args:
        q: queries ``[B, T, N, H]`` (N heads of width H).
        k: keys ``[B, T, N, H]``.
        v: values ``[B, T, N, H]``.
        attention: one of `ATTENTION_IMPLEMENTATIONS` (see `attention_implementation`).

    Returns:
        ``[B, T, N, H]``, in ``q``'s dtype; position ``t`` attends to positions ``<= t``.

    Example:
        >>> q = jnp.ones((2, 5, 3, 4))  # [B, T, N, H]
        >>> causal_attention(q, q, q).shape
        (2, 5, 3, 4)
    """
    impl = attention_implementation(attention, q.dtype, q.shape[-1])
    if impl == "cudnn" and attention == "auto":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError):
            # JAX refused to build the cuDNN call (no cuDNN, too old, unsupported shape):
            # "auto" means the best that runs here, which is XLA's.
            impl = "xla"
    chosen: Literal["xla", "cudnn"] = "cudnn" if impl == "cudnn" else "xla"
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=chosen)


def _dense_general_init(key: jax.Array, shape: tuple[int, ...], dtype: Any, n_in: int):
    """Flax ``DenseGeneral``'s lecun-normal kernel: drawn flat ``[in, out]``, reshaped."""
    flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
    return nn.initializers.lecun_normal()(key, flat, dtype).reshape(shape)


class _Projection(nn.Module):
    """The ``kernel`` and ``bias`` of one Flax ``DenseGeneral``, returned, not applied.

    Same names and initial values as ``DenseGeneral``'s; returning them lets the attention
    fuse q, k and v into one matrix product.
    """

    kernel_shape: tuple[int, ...]
    n_in: int  # leading kernel axes that are contracted

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param(
            "kernel",
            lambda k, s, d: _dense_general_init(k, s, d, self.n_in),
            self.kernel_shape,
            jnp.float32,
        )
        bias = self.param(
            "bias", nn.initializers.zeros_init(), self.kernel_shape[self.n_in :], jnp.float32
        )
        return kernel, bias


class _CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention ``[B, T, D] -> [B, T, D]``.

    Parameters as in ``nn.MultiHeadDotProductAttention``: ``query``/``key``/``value``
    kernels ``[D, N, H]`` and biases ``[N, H]``, ``out`` kernel ``[N, H, D]`` and bias
    ``[D]``. The three input projections run as one ``[D, 3N, H]`` matrix product.
    """

    num_heads: int
    attention: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        n, h = self.num_heads, d // self.num_heads
        kq, bq = _Projection((d, n, h), 1, name="query")()
        kk, bk = _Projection((d, n, h), 1, name="key")()
        kv, bv = _Projection((d, n, h), 1, name="value")()
        ko, bo = _Projection((n, h, d), 2, name="out")()
        kernel = jnp.concatenate([kq, kk, kv], axis=1)  # [D, 3N, H]
        bias = jnp.concatenate([bq, bk, bv], axis=0)  # [3N, H]
        x, kernel, bias, ko, bo = nn.dtypes.promote_dtype(x, kernel, bias, ko, bo)
        qkv = jnp.einsum("btd,dnh->btnh", x, kernel) + bias  # [B, T, 3N, H]
        q, k, v = jnp.split(qkv, 3, axis=2)
        # Attention has no parameters, so init never needs cuDNN, whose kernels refuse the
        # float32 that init runs in (attention="cudnn" would make init raise).
        attention = "xla" if self.is_initializing() else self.attention
        out = causal_attention(q, k, v, attention)  # [B, T, N, H]
        return jnp.einsum("btnh,nhd->btd", out, ko) + bo


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention then a 4x GELU MLP."""

    num_heads: int
    dropout: float
    deterministic: bool
    attention: str
    scanned: bool = False  # nn.scan's signature: carry -> (carry, None)

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> Any:
        """``x``: ``[B, T, D]`` -> ``[B, T, D]`` (``(x, None)`` when scanned)."""
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        # Named as the nn.MultiHeadDotProductAttention it replaced: the same parameter
        # tree, so checkpoints of the earlier model restore.
        h = _CausalSelfAttention(
            self.num_heads, self.attention, name="MultiHeadDotProductAttention_0"
        )(h)
        x = x + nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * d)(h)
        h = nn.Dense(d)(nn.gelu(h))
        x = x + nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        return (x, None) if self.scanned else x


class TransformerLM(nn.Module):
    """A decoder-only (GPT-style) language model with fused causal attention.

    Token and learned position embeddings, ``num_layers`` pre-LayerNorm blocks (causal
    self-attention, then a 4x GELU MLP), a final LayerNorm and the output projection (the
    token embedding's transpose when ``tie_embeddings``).

    Attributes:
        vocab_size: number of tokens.
        max_len: longest sequence (learned positional embeddings).
        d_model: embedding width.
        num_heads: attention heads (``d_model`` must be divisible by it).
        num_layers: transformer blocks.
        dropout: dropout rate on the embeddings and on each residual branch (training
            only). Fused attention has no dropout on the attention weights.
        attention: ``"auto"`` (default: cuDNN flash attention on NVIDIA GPUs in
            bfloat16/float16, XLA elsewhere), ``"xla"`` or ``"cudnn"``.
        remat: None (default: keep activations for the backward pass) or a name from
            `REMAT_POLICIES`: each block runs under ``jax.checkpoint`` with that policy.
        scan_layers: one ``nn.scan`` over the blocks (parameters stacked under
            ``params["layers"]``, leading axis ``num_layers``): compile time flat in depth.
        tie_embeddings: the output projection is the token embedding's transpose (no
            bias), as in GPT-2; the token embedding is then drawn from N(0, 0.02^2), as
            GPT-2's, so the initial logits are small.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lm = TransformerLM(vocab_size=11, max_len=8, d_model=16, num_heads=2, num_layers=1)
        >>> tokens = jnp.zeros((2, 5), jnp.int32)  # [B, T], T <= max_len
        >>> variables = jax.eval_shape(lm.init, jax.random.key(0), tokens)  # shapes only
        >>> jax.eval_shape(lm.apply, variables, tokens).shape  # logits [B, T, vocab_size]
        (2, 5, 11)
        >>> deep = TransformerLM(11, max_len=8, d_model=16, num_heads=2, num_layers=4,
        ...                      scan_layers=True, remat="dots_saveable")
        >>> v = jax.eval_shape(deep.init, jax.random.key(0), tokens)
        >>> v["params"]["layers"]["Dense_0"]["kernel"].shape  # [num_layers, D, 4D]
        (4, 16, 64)
    """

    vocab_size: int
    max_len: int = 128
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    dropout: float = 0.0
    attention: str = "auto"
    remat: str | None = None
    scan_layers: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        # Bad settings fail when the model is built, not deep inside a trace.
        _check_attention(self.attention)
        remat_policy(self.remat)
        for name in ("scan_layers", "tie_embeddings"):  # a truthy "no" would switch them on
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{name} must be True or False; got {getattr(self, name)!r}. Fix: "
                    f"{name}=True or {name}=False."
                )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}. "
                "Fix: choose num_heads dividing d_model (e.g. d_model=768, num_heads=12)."
            )
        super().__post_init__()

    def _blocks(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """The ``num_layers`` blocks, unrolled or scanned, rematerialised or not."""
        kwargs = dict(
            num_heads=self.num_heads,
            dropout=self.dropout,
            deterministic=deterministic,
            attention=self.attention,
        )
        policy = remat_policy(self.remat)
        if not self.scan_layers:
            block: Any = _Block
            if self.remat is not None:
                block = nn.remat(block, policy=policy)
            for i in range(self.num_layers):
                # Explicit names: the same tree with or without remat (nn.remat renames).
                x = block(**kwargs, name=f"_Block_{i}")(x)
            return x
        block = _Block
        if self.remat is not None:
            # Inside a scan, XLA cannot CSE the recomputation away: no need to prevent it
            # (prevent_cse=True would only add optimisation barriers).
            block = nn.remat(block, policy=policy, prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.num_layers,
        )
        x, _ = scanned(**kwargs, scanned=True, name=_LAYERS)(x, None)
        return x

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """``tokens``: int ``[B, T]`` with ``T <= max_len`` -> logits ``[B, T, vocab_size]``."""
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be a [batch, length] array of token ids; got shape "
                f"{tuple(tokens.shape)}. Fix: add a batch axis for one sequence (tokens[None]), "
                "or drop a trailing feature axis ([B, T, 1] -> tokens[..., 0])."
            )
        _, t = tokens.shape
        if t > self.max_len:
            raise ValueError(
                f"sequence length {t} exceeds max_len={self.max_len}. Fix: feed at most "
                f"{self.max_len} tokens per sequence, or build the model with max_len >= {t}."
            )
        embed_init = (
            nn.initializers.normal(0.02) if self.tie_embeddings else nn.linear.default_embed_init
        )
        embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=embed_init)
        x = embed(tokens)  # [B, T, D]
        x = x + nn.Embed(self.max_len, self.d_model)(jnp.arange(t))[None]
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = self._blocks(x, deterministic=not train)
        x = nn.LayerNorm()(x)
        if self.tie_embeddings:
            return embed.attend(x)  # [B, T, V]
        return nn.Dense(self.vocab_size)(x)  # [B, T, V]


def gpt2_small(**overrides: Any) -> TransformerLM:
    """A `TransformerLM` of GPT-2 small's size: 124,475,904 parameters.

    12 layers, d_model 768, 12 heads, vocabulary 50,304, context 1,024, tied embeddings,
    layers scanned (`GPT2_SMALL`).

    Args:
        **overrides: any `TransformerLM` attribute, e.g. ``remat="dots_saveable"``.

    Returns:
        The module (nothing is allocated; use ``jax.eval_shape(lm.init, ...)`` for shapes).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lm = gpt2_small()
        >>> tokens = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
        >>> shapes = jax.eval_shape(lm.init, jax.random.key(0), tokens)  # no allocation
        >>> sum(x.size for x in jax.tree.leaves(shapes))
        124475904
    """
    return TransformerLM(**{**GPT2_SMALL, **overrides})


def _block_names(params: Mapping[str, Any]) -> list[str]:
    names = sorted((k for k in params if _BLOCK.fullmatch(k)), key=lambda k: int(k[7:]))
    if [int(k[7:]) for k in names] != list(range(len(names))):
        raise ValueError(
            f"the blocks in params are {names}, not _Block_0 ... _Block_{len(names) - 1}. "
            "Fix: pass the params of an unrolled TransformerLM (scan_layers=False)."
        )
    return names


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled `TransformerLM` parameters as the scanned model's (``scan_layers=True``).

    Args:
        params: the ``params`` of a ``scan_layers=False`` model: ``_Block_0`` ...
            ``_Block_{L-1}`` next to the embeddings, final LayerNorm and head.

    Returns:
        The same tree with the blocks replaced by ``"layers"``: every leaf stacked along a
        new leading axis of size L. The other entries are the same objects.

    Raises:
        ValueError: no ``_Block_i`` entries, a gap in their numbering, or already stacked.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lm = TransformerLM(11, max_len=8, d_model=16, num_heads=2, num_layers=3)
        >>> tokens = jnp.zeros((1, 8), jnp.int32)
        >>> p = jax.eval_shape(lm.init, jax.random.key(0), tokens)["params"]  # shapes only
        >>> jax.eval_shape(stack_layers, p)["layers"]["Dense_0"]["kernel"].shape  # [L, D, 4D]
        (3, 16, 64)
    """
    if _LAYERS in params:
        raise ValueError(
            "params already hold stacked 'layers' (a scan_layers=True model). Fix: pass the "
            "params of a scan_layers=False model, or use them as they are."
        )
    names = _block_names(params)
    if not names:
        raise ValueError(
            f"no _Block_i entries in params (keys: {sorted(params)}). Fix: pass the params "
            "of a TransformerLM with scan_layers=False."
        )
    out = {k: v for k, v in params.items() if k not in names}
    out[_LAYERS] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))
    return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned `TransformerLM` parameters as the unrolled model's (``scan_layers=False``).

    Args:
        params: the ``params`` of a ``scan_layers=True`` model (with ``"layers"``).

    Returns:
        The same tree with ``"layers"`` split into ``_Block_0`` ... ``_Block_{L-1}``.

    Raises:
        ValueError: ``params`` has no ``"layers"`` entry.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lm = TransformerLM(11, max_len=8, d_model=16, num_heads=2, num_layers=3,
        ...                    scan_layers=True)
        >>> tokens = jnp.zeros((1, 8), jnp.int32)
        >>> p = jax.eval_shape(lm.init, jax.random.key(0), tokens)["params"]  # shapes only
        >>> sorted(k for k in jax.eval_shape(unstack_layers, p) if k.startswith("_Block"))
        ['_Block_0', '_Block_1', '_Block_2']
    """
    if _LAYERS not in params:
        raise ValueError(
            f"params have no stacked 'layers' entry (keys: {sorted(params)}). Fix: pass the "
            "params of a TransformerLM with scan_layers=True."
        )
    stacked = params[_LAYERS]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != _LAYERS}
    for i in range(n):
        out[f"_Block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
