"""PyTorch next to jaxtrain: convert models, match optimizers, compare training runs.

PyTorch is an optional dependency (``pip install torch==2.13.0`` then
``pip install -e .[torch]``). Importing ``jaxtrain.contrast`` does not import it; the
functions that need it import it when called and say how to install it when it is
missing. The core package (``import jaxtrain``) never imports it.

* `from_torch`: a PyTorch module -> an equivalent JAX model with identical weights: an
  ``nn.Sequential`` of built-in layers becomes a Flax model (`Converted`), any other module
  ``torch.fx`` can trace (residual blocks, ``torch.cat``, ...) a pure function
  (`from_torch_fx`, `FxConverted`). BatchNorm's running statistics are ``model_state``;
  ``state_dict`` goes back to PyTorch.
* `OptimizerSpec`, `make_torch`, `make_optax`: one optimizer/schedule spec, both sides
  (`CORRESPONDENCE` is the table; `clip_by_global_norm_torch` is PyTorch's clipping).
* `spec_from_torch`: the user's own ``torch.optim`` optimizer/scheduler constructors -> spec.
* `with_plateau_lr`, `plateau_step`: ``ReduceLROnPlateau`` as optimizer state + a pure step.
* `compare`: the same batches through a PyTorch loop (``model.train()``) and
  `jaxtrain.make_train_step` (``train=True``), BatchNorm included, dropout refused
  (``dtype="float64"``: both sides in float64, exact parity).
* `freeze`: frozen parameters with an optax mask (PyTorch: ``requires_grad_(False)``).
* `step_anatomy`: the forward jaxpr, FLOPs and bytes of a compiled train step.
"""

from jaxtrain.contrast.anatomy import StepAnatomy, step_anatomy
from jaxtrain.contrast.convert import Converted, from_torch, nchw_to_nhwc, nhwc_to_nchw, torch_twin
from jaxtrain.contrast.fx import FxConverted, from_torch_fx
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
from jaxtrain.contrast.plateau import plateau_step, with_plateau_lr
from jaxtrain.contrast.runner import Comparison, compare, digits_models, presets
from jaxtrain.contrast.torch_optim import spec_from_torch

__all__ = [
    "CORRESPONDENCE",
    "Comparison",
    "Converted",
    "FxConverted",
    "OptimizerSpec",
    "StepAnatomy",
    "clip_by_global_norm_torch",
    "compare",
    "correspondence_markdown",
    "digits_models",
    "freeze",
    "from_torch",
    "from_torch_fx",
    "jax_loss",
    "make_optax",
    "make_torch",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "plateau_step",
    "presets",
    "spec_from_torch",
    "step_anatomy",
    "torch_clip",
    "torch_loss",
    "torch_twin",
    "with_plateau_lr",
]
