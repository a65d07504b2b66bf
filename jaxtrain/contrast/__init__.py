"""PyTorch next to jaxtrain: convert models, match optimizers, compare training runs.

PyTorch is an optional dependency (``pip install torch==2.13.0`` then
``pip install -e .[torch]``). Importing ``jaxtrain.contrast`` does not import it; the
functions that need it import it when called and say how to install it when it is
missing. The core package (``import jaxtrain``) never imports it.

* `from_torch`: an ``nn.Sequential`` -> an equivalent Flax model with identical weights.
* `OptimizerSpec`, `make_torch`, `make_optax`: one optimizer/schedule spec, both sides
  (`CORRESPONDENCE` is the table; `clip_by_global_norm_torch` is PyTorch's clipping).
* `compare`: the same batches through a PyTorch loop and `jaxtrain.make_train_step`.
* `freeze`: frozen parameters with an optax mask (PyTorch: ``requires_grad_(False)``).
* `step_anatomy`: the forward jaxpr, FLOPs and bytes of a compiled train step.
"""

from jaxtrain.contrast.anatomy import StepAnatomy, step_anatomy
from jaxtrain.contrast.convert import Converted, from_torch, nchw_to_nhwc, nhwc_to_nchw, torch_twin
from jaxtrain.contrast.optim import (
    CORRESPONDENCE,
    OptimizerSpec,
    clip_by_global_norm_torch,
    correspondence_markdown,
    freeze,
    jax_loss,
    make_optax,
    make_torch,
    torch_clip,
    torch_loss,
)
from jaxtrain.contrast.runner import Comparison, compare, digits_models, presets

__all__ = [
    "CORRESPONDENCE",
    "Comparison",
    "Converted",
    "OptimizerSpec",
    "StepAnatomy",
    "clip_by_global_norm_torch",
    "compare",
    "correspondence_markdown",
    "digits_models",
    "freeze",
    "from_torch",
    "jax_loss",
    "make_optax",
    "make_torch",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "presets",
    "step_anatomy",
    "torch_clip",
    "torch_loss",
    "torch_twin",
]
