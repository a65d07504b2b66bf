"""The package's shape: the core never imports the applications, and exports the core only.

Static (``ast``) checks, no subprocess: every module of the core (``jaxtrain/*.py`` and
``jaxtrain/models/``) is parsed and its module-level imports (``if TYPE_CHECKING:``
blocks included) must not reach `jaxtrain.apps`, `jaxtrain.contrast` or torch.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import jaxtrain

ROOT = pathlib.Path(jaxtrain.__file__).parent
FORBIDDEN = ("jaxtrain.apps", "jaxtrain.contrast", "torch")
# Entry points: run by ``python -m jaxtrain``, never imported by ``import jaxtrain``.
ENTRY_POINTS = {"__main__.py"}
CORE = sorted(
    p for p in [*ROOT.glob("*.py"), *ROOT.glob("models/*.py")] if p.name not in ENTRY_POINTS
)


def _module_level_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of the imports outside functions and classes.

    ``from jaxtrain import apps`` counts as ``jaxtrain.apps``; relative imports are
    resolved against ``jaxtrain``.
    """
    found: list[tuple[int, str]] = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ("jaxtrain." if node.level else "") + (node.module or "")
                base = base.rstrip(".")
                found.append((node.lineno, base))
                found.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text(), str(path)).body)
    return found


def _offenders(path: pathlib.Path) -> list[str]:
    return [
        f"{path.relative_to(ROOT.parent)}:{line} imports {name}"
        for line, name in _module_level_imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]


def test_the_core_modules_were_found():
    names = {p.name for p in CORE}
    assert {"__init__.py", "loop.py", "step.py", "state.py", "writers.py"} <= names, names
    assert not {"job.py", "cli.py", "text.py", "tasks.py", "logging.py"} & names, names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_never_imports_the_applications_or_torch(path):
    offenders = _offenders(path)
    assert not offenders, (
        "the core must not import the applications or torch at module level: "
        + "; ".join(offenders)
        + ". Fix: move the code that needs them into jaxtrain/apps/ (or jaxtrain/contrast/), "
        "or import it inside the function that needs it."
    )


def test_the_import_check_catches_an_application_import(tmp_path):
    # The check itself can fail: each spelling of an application import is caught.
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import jaxtrain.apps.cli\n"
        "from jaxtrain import apps\n"
        "from jaxtrain.contrast import compare\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\n"
        "def f():\n    import torch  # inside a function: allowed\n"
    )
    found = [n for _, n in _module_level_imports(bad)]
    assert "jaxtrain.apps.cli" in found and "jaxtrain.apps" in found
    assert "jaxtrain.contrast" in found and found.count("torch") == 1


# The core vocabulary (issue 12): state, steps, fit and its callbacks, data, model
# adapters, mesh helpers, precision policy, and submodules; issue 13 added init_sharded,
# issue 14 population training.
CORE_NAMES = {
    "TrainState",
    "make_train_step",
    "make_train_steps",
    "make_device_epoch",
    "make_eval_step",
    "CompiledStep",
    "StepSpec",
    "fit",
    "evaluate",
    "History",
    "LoopState",
    "Callback",
    "PeriodicHook",
    "EventHook",
    "EarlyStopping",
    "Preempted",
    "ArrayDataset",
    "DataPosition",
    "GrainData",
    "Model",
    "from_linen",
    "from_nnx",
    "from_function",
    "data_mesh",
    "make_mesh",
    "replicate",
    "shard_batch",
    "shard_state",
    "init_sharded",
    "Policy",
    "PopulationState",
    "make_population_step",
    "make_population_eval_step",
    "population",
    "losses",
    "metrics",
    "models",
    "parallel",
    "distributed",
    "__version__",
}


def test_jaxtrain_exports_the_core_vocabulary_only():
    assert set(jaxtrain.__all__) == CORE_NAMES
    for name in jaxtrain.__all__:
        assert hasattr(jaxtrain, name), name


@pytest.mark.parametrize(
    "old, new",
    [
        ("CNN", "jaxtrain.models.CNN"),
        ("load_digits", "jaxtrain.data.load_digits"),
        ("JsonlWriter", "jaxtrain.writers.JsonlWriter"),
        ("classification_loss", "jaxtrain.apps.tasks.classification_loss"),
        ("plot_curves", "jaxtrain.apps.plots.plot_curves"),
        ("preflight", "jaxtrain.apps.doctor.preflight"),
        ("step_flops", "jaxtrain.perf.step_flops"),
        ("state_shardings", "jaxtrain.parallel.state_shardings"),
        ("DynamicLossScale", "jaxtrain.precision.DynamicLossScale"),
    ],
)
def test_moved_names_live_at_their_new_spelling_only(old, new):
    import importlib

    module, _, name = new.rpartition(".")
    assert hasattr(importlib.import_module(module), name), new
    assert old not in jaxtrain.__all__ and not hasattr(jaxtrain, old), (
        f"jaxtrain.{old} is exported flat again; the changelog (docs/changelog.md) spells it {new}"
    )


def test_the_renamed_modules_are_gone():
    import importlib

    for old in (
        "job",
        "cli",
        "logging",
        "text",
        "tasks",
        "doctor",
        "plots",
        "fields",
        "run_folder",
    ):
        with pytest.raises(ModuleNotFoundError, match=f"jaxtrain.{old}"):
            importlib.import_module(f"jaxtrain.{old}")


def test_python_dash_m_jaxtrain_runs_the_command_line():
    # `python -m jaxtrain` is the `jaxtrain` command; the module is an entry point only.
    import jaxtrain.__main__ as entry
    from jaxtrain.apps import cli

    assert entry.main is cli.main
    assert ENTRY_POINTS == {"__main__.py"}
