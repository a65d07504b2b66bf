"""Character-level language modelling: a corpus on every machine, a vocabulary, windows, sampling.

The pieces of a character-level LM run, each a small pure utility:

* `stdlib_corpus` — English text that ships with every Python install (the docstrings
  of standard-library modules), so examples and tests need no download.
* `CharVocab` — characters <-> integer ids, saved as plain JSON data.
* `lm_windows` — a token stream cut into ``{"x": [N, T], "y": [N, T]}`` next-token
  pairs for `jaxtrain.ArrayDataset`.
* `generate` — autoregressive sampling from a `jaxtrain.models.TransformerLM` with a
  fixed-shape jitted step that compiles once.

Example:
    >>> vocab = CharVocab.from_text("hello world")
    >>> vocab.decode(vocab.encode("hello"))
    'hello'
    >>> w = lm_windows(vocab.encode("hello world"), seq_len=4)
    >>> w["x"].shape, w["x"][0].tolist()[1:] == w["y"][0].tolist()[:-1]
    ((2, 4), True)

What must not live here: the model (`jaxtrain.models.TransformerLM`) and the training loop.
Part of `jaxtrain.apps`: the core never imports it.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.models.adapters import Model
from jaxtrain.state import as_key_data
from jaxtrain.step import CompiledStep

# A fixed, sorted list of pure-Python or always-built-in standard-library modules that
# import without side effects on every platform (no GUI, no network, no "this").
STDLIB_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "mailbox",
    "math",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
)


def _public_docs(module: Any) -> Iterable[str]:
    """The module's docstring, then those of its public classes, methods and functions."""
    yield module.__doc__ or ""
    for name in sorted(n for n in vars(module) if not n.startswith("_")):
        obj = vars(module)[name]
        # Only objects defined in this module: re-exports would repeat other modules.
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield obj.__doc__ or ""
        if inspect.isclass(obj):
            for attr in sorted(n for n in vars(obj) if not n.startswith("_")):
                member = vars(obj)[attr]
                if inspect.isfunction(member):
                    yield member.__doc__ or ""


def stdlib_corpus(max_chars: int | None = 300_000, modules: Sequence[str] = STDLIB_MODULES) -> str:
    """English text found on every machine: docstrings of standard-library modules.

    Modules are visited in the given (sorted) order; within a module, its docstring
    comes first, then its public classes (and their public methods) and functions
    sorted by name. Each docstring is dedented (``inspect.cleandoc``), repeated
    docstrings are kept once, and documents are separated by a blank line. The result
    is deterministic for a given Python version (docstrings change between versions).

    Args:
        max_chars: cut the text to at most this many characters (None: everything,
            about 0.6-1 M characters depending on the Python version).
        modules: standard-library module names to read.

    Returns:
        The corpus as one string.

    Raises:
        RuntimeError: when no docstrings are available (Python run with ``-OO``).

    Example:
        >>> text = stdlib_corpus(max_chars=1000, modules=("json",))
        >>> len(text), text == stdlib_corpus(max_chars=1000, modules=("json",))
        (1000, True)
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive integer or None; got {max_chars!r}.")
    seen: set[str] = set()
    parts: list[str] = []
    total = 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module missing from a stripped-down Python build
            continue
        for doc in _public_docs(module):
            doc = inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""
            if len(doc) < 20 or doc in seen:  # skip one-word stubs and repeats
                continue
            seen.add(doc)
            parts.append(doc)
            total += len(doc) + 2
            if max_chars is not None and total >= max_chars:
                return "\n\n".join(parts)[:max_chars]
    if not parts:
        raise RuntimeError(
            "no standard-library docstrings found: Python strips them under -OO "
            "(PYTHONOPTIMIZE=2). Fix: run without -OO, or pass your own text (--text FILE)."
        )
    return "\n\n".join(parts)


class CharVocab:
    """A character vocabulary: each distinct character of a text gets an integer id.

    Ids are assigned in sorted character order, so the same text always gives the same
    vocabulary.

    Args:
        chars: the distinct characters, in id order.

    Example:
        >>> v = CharVocab.from_text("abca")
        >>> v.size, v.encode("cab").tolist(), v.decode([0, 1])
        (3, [2, 0, 1], 'ab')
    """

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"chars must be single characters; got {bad[:5]!r}.")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct; the vocabulary has repeated characters.")
        if not chars:
            raise ValueError("a vocabulary needs at least one character; got none.")
        self.chars: list[str] = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of the distinct characters in ``text``, sorted."""
        return cls(sorted(set(text)))

    @property
    def size(self) -> int:
        """Number of ids ``V`` (the model's ``vocab_size``)."""
        return len(self.chars)

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids ``[len(text)]``.

        Raises:
            ValueError: naming the characters that are not in the vocabulary.
        """
        try:
            return np.fromiter((self._index[c] for c in text), np.int32, count=len(text))
        except KeyError:
            unknown = sorted({c for c in text if c not in self._index})
            raise ValueError(
                f"text has {len(unknown)} character(s) not in the vocabulary: {unknown[:10]!r}. "
                "Fix: build the vocabulary from text that contains them."
            ) from None

    def decode(self, ids: Iterable[int] | np.ndarray | jax.Array) -> str:
        """Ids ``[L]`` (any integer sequence or array) -> text of length ``L``."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(
                f"ids must be in [0, {self.size}); got range [{ids.min()}, {ids.max()}]."
            )
        return "".join(self.chars[i] for i in ids.tolist())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``{"chars": [one string per id]}``."""
        return {"chars": list(self.chars)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CharVocab:
        """Inverse of `to_dict` (accepts the result of ``json.loads(json.dumps(...))``)."""
        if not isinstance(d, Mapping) or "chars" not in d:
            raise ValueError(f"expected a dict with a 'chars' list; got {d!r:.80}.")
        return cls(d["chars"])

    def to_json(self) -> str:
        """`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharVocab(size={self.size})"


def lm_windows(
    ids: Sequence[int] | np.ndarray, seq_len: int, stride: int | None = None
) -> dict[str, np.ndarray]:
    """Cuts a token stream into next-token training pairs.

    Window ``i`` covers ``ids[i * stride : i * stride + seq_len + 1]``; its first
    ``seq_len`` tokens are the input and its last ``seq_len`` the target, so
    ``y[i, t] == x[i, t + 1]`` and ``y[i, t]`` is the token that follows ``x[i, t]``.
    With the default ``stride == seq_len`` the windows do not overlap (each input token
    is seen once per epoch); a smaller stride makes overlapping windows (more, correlated
    examples). Tokens after the last complete window are dropped.

    Args:
        ids: int token ids ``[L]``.
        seq_len: tokens per window ``T`` (at most the model's ``max_len``).
        stride: distance between window starts (default ``seq_len``).

    Returns:
        ``{"x": int32 [N, T], "y": int32 [N, T]}`` with
        ``N = (L - T - 1) // stride + 1``.

    Raises:
        ValueError: when ``L < T + 1`` (not even one window).

    Example:
        >>> w = lm_windows(list(range(10)), seq_len=4)  # L = 10, T = 4: N = 2 windows
        >>> w["x"].shape, w["x"][0].tolist(), w["y"][0].tolist()
        ((2, 4), [0, 1, 2, 3], [1, 2, 3, 4])
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    stride = seq_len if stride is None else stride
    for name, v in (("seq_len", seq_len), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    if len(ids) < seq_len + 1:
        raise ValueError(
            f"need at least seq_len + 1 = {seq_len + 1} tokens for one window; got {len(ids)}. "
            "Fix: use more text or a shorter seq_len."
        )
    n = (len(ids) - seq_len - 1) // stride + 1
    idx = np.arange(n)[:, None] * stride + np.arange(seq_len + 1)[None, :]  # [N, T + 1]
    windows = ids[idx]
    return {"x": windows[:, :-1], "y": windows[:, 1:]}


def _sample_step(apply_fn, params, model_state, window, n, key, i, temperature):
    """One token: ``window`` int32 ``[M]`` holds ``n`` tokens left-aligned (1 <= n <= M).

    Returns ``(token, new_window, new_n)``: the token sampled with ``fold_in(key, i)``
    from the logits at position ``n - 1``, appended at index ``n`` (or, when the window
    is full, the window shifted left by one and the token put last).
    """
    sample_step._count_trace()  # trace time only: counts compilations
    logits, _ = apply_fn(params, model_state, window[None], train=False)  # [1, M, V]
    logits = jax.lax.dynamic_index_in_dim(logits[0], n - 1, keepdims=False)  # [V]
    logits = logits.astype(jnp.float32)
    sampled = jax.random.categorical(
        jax.random.fold_in(key, i), logits / jnp.maximum(temperature, 1e-6)
    )
    token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
    size = window.shape[0]
    full = n >= size
    shifted = jnp.roll(window, -1).at[-1].set(token)
    appended = window.at[jnp.minimum(n, size - 1)].set(token)
    return token, jnp.where(full, shifted, appended), jnp.minimum(n + 1, size)


#: The jitted per-token sampling step used by `generate` (``trace_count`` counts its
#: compilations: one per model, whatever the prompt length, ``num_tokens`` or rng).
sample_step = CompiledStep(_sample_step, jax.jit(_sample_step, static_argnums=0))


def _context_len(params: Any) -> int:
    try:
        return int(params["Embed_1"]["embedding"].shape[0])
    except (KeyError, TypeError, AttributeError):
        raise ValueError(
            "cannot read the context length from params (expected TransformerLM's positional "
            "embedding params['Embed_1']['embedding'] [max_len, D]). Fix: pass context_len=."
        ) from None


def generate(
    model: Model,
    params: Any,
    model_state: Any,
    prompt_ids: Sequence[int] | np.ndarray,
    num_tokens: int,
    rng: jax.Array | int,
    temperature: float = 1.0,
    *,
    context_len: int | None = None,
) -> np.ndarray:
    """Samples ``num_tokens`` tokens autoregressively, one compiled step per token.

    The model always sees a fixed-shape context ``[1, M]`` (``M = context_len``, the
    model's ``max_len``): the latest ``<= M`` tokens left-aligned, zero padding after
    them. The causal mask keeps the padding from influencing the logits at the current
    position ``n - 1``, which are the ones sampled from. When the context is full it
    slides left by one token per step. Because every shape is fixed, the step compiles
    once per model (see ``sample_step.trace_count``), whatever the prompt length,
    ``num_tokens``, ``rng`` or ``temperature``. Token ``i`` is drawn with
    ``jax.random.fold_in(rng, i)``. Tokens stay on the device until the end (one host
    transfer in total).

    Args:
        model: a `Model` wrapping `jaxtrain.models.TransformerLM` (``from_linen``); any causal
            model ``[B, M] int -> [B, M, V]`` works with ``context_len`` given.
        params: the model parameters (e.g. ``state.params``).
        model_state: the model state (e.g. ``state.model_state``; ``{}`` for
            TransformerLM).
        prompt_ids: int ids ``[P]`` with ``P >= 1``; only the last ``M`` are used.
        num_tokens: how many new tokens to sample (``>= 0``).
        rng: an int seed or a key (typed or raw key data).
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        context_len: the model's ``max_len``; read from TransformerLM's positional
            embedding when None.

    Returns:
        The new tokens only, int32 ``[num_tokens]`` (prompt not included).

    Example:
        >>> import jax.numpy as jnp, jaxtrain as jt
        >>> # A bigram "model" [B, M] -> [B, M, V]: after token t, t + 1 (mod 5) is likely.
        >>> model = jt.from_function(lambda p, tokens: p["table"][tokens])
        >>> params = {"table": 10.0 * jnp.eye(5)[jnp.array([1, 2, 3, 4, 0])]}
        >>> generate(model, params, {}, [0], num_tokens=6, rng=0, temperature=0.0,
        ...          context_len=4).tolist()  # greedy
        [1, 2, 3, 4, 0, 1]
    """
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("prompt_ids must hold at least one token; got an empty prompt.")
    if (
        isinstance(num_tokens, bool)
        or not isinstance(num_tokens, (int, np.integer))
        or num_tokens < 0
    ):
        raise ValueError(f"num_tokens must be an integer >= 0; got {num_tokens!r}.")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0; got {temperature!r}.")
    size = _context_len(params) if context_len is None else int(context_len)
    prompt = prompt[-size:]
    window: Any = np.zeros(size, np.int32)  # filled here, then a device array
    window[: prompt.size] = prompt
    window, n = jnp.asarray(window), jnp.asarray(prompt.size, jnp.int32)
    key = jax.random.wrap_key_data(as_key_data(rng))
    temp = jnp.asarray(temperature, jnp.float32)
    tokens = []
    for i in range(num_tokens):
        token, window, n = sample_step(
            model.apply, params, model_state, window, n, key, jnp.int32(i), temp
        )
        tokens.append(token)  # a device scalar: no host sync inside the loop
    if not tokens:
        return np.zeros(0, np.int32)
    return np.asarray(jax.device_get(jnp.stack(tokens)), np.int32)
