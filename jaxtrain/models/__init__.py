"""Models: adapters to one pure apply, and the built-in models."""

from jaxtrain.models.adapters import Model, from_function, from_linen, from_nnx
from jaxtrain.models.builtin import CNN, MLP, TransformerLM

__all__ = ["CNN", "MLP", "Model", "TransformerLM", "from_function", "from_linen", "from_nnx"]
