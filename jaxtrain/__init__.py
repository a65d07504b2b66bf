"""jaxtrain: the neural-network training cycle as pure JAX functions.

forward pass -> loss -> gradients (``jax.value_and_grad``) -> update (optax), threaded
through an explicit `TrainState` by a jit-compiled ``train_step(state, batch)``.

This namespace holds the core vocabulary only: the state, the step builders, ``fit`` and
its callbacks, the data sources, the model adapters, the mesh helpers and the precision
policy, population training (a vmapped step over N runs), plus the submodules
``losses``, ``metrics``, ``models``, ``parallel``, ``population`` and ``distributed``. Everything else is imported from its module (``jaxtrain.writers``,
``jaxtrain.data``, ``jaxtrain.perf``, ``jaxtrain.precision``, ``jaxtrain.checkpoint``).

What must not live here: the applications. ``jaxtrain.apps`` (the digits recipe, the
``jaxtrain`` command line, the task and char-LM helpers, plots, the doctor) and
``jaxtrain.contrast`` (the optional PyTorch comparison) build on the core; importing
``jaxtrain`` never imports them, nor torch.
"""

from jaxtrain import distributed, losses, metrics, models, parallel, population
from jaxtrain.callbacks import Callback
from jaxtrain.data import ArrayDataset, DataPosition
from jaxtrain.grain_data import GrainData
from jaxtrain.loop import (
    EarlyStopping,
    EventHook,
    History,
    PeriodicHook,
    Preempted,
    evaluate,
    fit,
)
from jaxtrain.loop_state import LoopState
from jaxtrain.models import Model, from_function, from_linen, from_nnx
from jaxtrain.parallel import (
    data_mesh,
    init_sharded,
    make_mesh,
    replicate,
    shard_batch,
    shard_state,
)
from jaxtrain.population import PopulationState
from jaxtrain.population_step import make_population_eval_step, make_population_step
from jaxtrain.precision import Policy
from jaxtrain.resident import make_device_epoch
from jaxtrain.state import TrainState
from jaxtrain.step import CompiledStep, make_eval_step, make_train_step, make_train_steps
from jaxtrain.step_options import StepSpec

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "Callback",
    "CompiledStep",
    "DataPosition",
    "EarlyStopping",
    "EventHook",
    "GrainData",
    "History",
    "LoopState",
    "Model",
    "PeriodicHook",
    "Policy",
    "PopulationState",
    "Preempted",
    "StepSpec",
    "TrainState",
    "__version__",
    "data_mesh",
    "distributed",
    "evaluate",
    "fit",
    "from_function",
    "from_linen",
    "from_nnx",
    "init_sharded",
    "losses",
    "make_device_epoch",
    "make_eval_step",
    "make_mesh",
    "make_population_eval_step",
    "make_population_step",
    "make_train_step",
    "make_train_steps",
    "metrics",
    "models",
    "parallel",
    "population",
    "replicate",
    "shard_batch",
    "shard_state",
]
