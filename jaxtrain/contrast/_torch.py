"""The one place that imports PyTorch, lazily, with an error that says how to install it."""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install torch==2.13.0 then pip install -e .[torch]"


def require_torch() -> Any:
    """Imports and returns the ``torch`` module.

    Raises:
        ImportError: when PyTorch is not installed, naming the install commands.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "jaxtrain.contrast needs PyTorch, which is an optional dependency and is not "
            f"installed ({e}). Fix: {INSTALL_HINT} (the CPU build is enough)."
        ) from e
    return torch
