"""Models: adapters to one pure apply, and the built-in models.

What must not live here: losses and tasks (`jaxtrain.losses`, `jaxtrain.apps.tasks`) and
PyTorch twins (`jaxtrain.contrast`). The models never import the loop, the applications or torch.
"""

from jaxtrain.models.adapters import Model, from_function, from_linen, from_nnx
from jaxtrain.models.builtin import CNN, MLP, TransformerLM

__all__ = ["CNN", "MLP", "Model", "TransformerLM", "from_function", "from_linen", "from_nnx"]
