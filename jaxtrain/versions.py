"""Versions of jaxtrain and the JAX stack, for summaries and checkpoints.

Nothing else lives here; it never imports the loop, the applications or torch.
"""

from __future__ import annotations


def versions() -> dict[str, str]:
    """``{package: version}`` for jaxtrain, jax, jaxlib, flax, optax and orbax-checkpoint."""
    import flax
    import jax
    import jaxlib
    import optax
    import orbax.checkpoint

    from jaxtrain import __version__

    return {
        "jaxtrain": __version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
    }
