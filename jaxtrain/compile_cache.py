"""JAX's persistent compilation cache, switched on with one call.

A second run of the same step on the same machine loads the compiled executable from
disk instead of compiling it again (the time to the first step drops to a fraction).

What must not live here: anything but the switch. It never imports the loop, the
applications (`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import os

import jax


def enable_compilation_cache(directory: str | os.PathLike) -> str:
    """Caches every compiled executable in ``directory`` (created if missing).

    Args:
        directory: a writable folder; share it between runs to reuse compilations.

    Returns:
        The absolute path used.

    Raises:
        ValueError: when the folder cannot be created or written.

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = enable_compilation_cache(os.path.join(tmp.name, "jax_cache"))
        >>> os.path.isdir(path), jax.config.jax_compilation_cache_dir == path
        (True, True)
        >>> jax.config.update("jax_compilation_cache_dir", None)  # off again, for this example
        >>> tmp.cleanup()
    """
    path = os.path.abspath(os.fspath(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"compilation cache directory {path!r} cannot be created ({e.strerror}). "
            "Fix: pass a writable folder."
        ) from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"compilation cache directory {path!r} is not writable.")
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache everything: the steps people iterate on are small and compile in seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
