"""jaxtrain: the neural-network training cycle as pure JAX functions.

forward pass -> loss -> gradients (``jax.value_and_grad``) -> update (optax), threaded
through an explicit `TrainState` by a jit-compiled ``train_step(state, batch)``.
"""

from jaxtrain import distributed, losses, metrics, models, parallel
from jaxtrain.callbacks import Callback
from jaxtrain.data import ArrayDataset, DataPosition, load_digits
from jaxtrain.doctor import preflight
from jaxtrain.grain_data import GrainData
from jaxtrain.logging import CsvWriter, JsonlWriter, TensorBoardWriter, read_csv, read_jsonl
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
from jaxtrain.models import (
    CNN,
    MLP,
    Model,
    TransformerLM,
    from_function,
    from_linen,
    from_nnx,
)
from jaxtrain.parallel import (
    data_mesh,
    make_mesh,
    replicate,
    shard_batch,
    shard_state,
    state_shardings,
)
from jaxtrain.perf import peak_flops, step_flops
from jaxtrain.plots import plot_curves, plot_runs
from jaxtrain.precision import DynamicLossScale, LossScaleState, Policy
from jaxtrain.resident import make_device_epoch, put_dataset
from jaxtrain.state import TrainState
from jaxtrain.step import CompiledStep, make_eval_step, make_train_step, make_train_steps
from jaxtrain.step_options import StepSpec
from jaxtrain.tasks import (
    classification_eval,
    classification_loss,
    init_model,
    regression_eval,
    regression_loss,
)

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "MLP",
    "ArrayDataset",
    "Callback",
    "CompiledStep",
    "CsvWriter",
    "DataPosition",
    "DynamicLossScale",
    "EarlyStopping",
    "EventHook",
    "GrainData",
    "History",
    "JsonlWriter",
    "LoopState",
    "LossScaleState",
    "Model",
    "PeriodicHook",
    "Policy",
    "Preempted",
    "StepSpec",
    "TensorBoardWriter",
    "TrainState",
    "TransformerLM",
    "__version__",
    "classification_eval",
    "classification_loss",
    "data_mesh",
    "distributed",
    "evaluate",
    "fit",
    "from_function",
    "from_linen",
    "from_nnx",
    "init_model",
    "load_digits",
    "losses",
    "make_device_epoch",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "make_train_steps",
    "metrics",
    "models",
    "parallel",
    "peak_flops",
    "plot_curves",
    "plot_runs",
    "preflight",
    "put_dataset",
    "read_csv",
    "read_jsonl",
    "regression_eval",
    "regression_loss",
    "replicate",
    "shard_batch",
    "shard_state",
    "state_shardings",
    "step_flops",
]
