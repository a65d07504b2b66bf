"""Every public name documents itself with a runnable example, and the example runs.

The names are discovered, not listed: everything in ``jaxtrain.__all__`` (modules in it are
expanded to their own public names), plus the public names of the submodules users import
directly. A name added to ``__all__`` without a docstring example fails
``test_every_public_name_has_an_example`` at once, listed by name.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import types

import pytest

import jaxtrain

# Submodules users import directly. None: every public function and class the module
# defines itself (or its ``__all__`` when it has one); a tuple: just those names.
SUBMODULES: dict[str, tuple[str, ...] | None] = {
    "jaxtrain.checkpoint": ("Checkpointer",),
    "jaxtrain.callbacks": ("Every", "PeriodicCallback"),
    "jaxtrain.losses": None,
    "jaxtrain.metrics": None,
    "jaxtrain.models": None,
    "jaxtrain.models.lm": None,  # issue 13: the LM's options, presets, layer conversion
    "jaxtrain.digests": None,  # issue 13: sharding-independent array digests
    "jaxtrain.parallel": ("init_sharded",),  # issue 13: a state created in its shardings
    "jaxtrain.apps.text": None,
    "jaxtrain.compile_cache": ("enable_compilation_cache",),
    "jaxtrain.perf": None,
    "jaxtrain.writers": None,
    "jaxtrain.contrast": None,
    # issue 15 (models): fx conversion, state dicts, PyTorch layers as JAX functions
    "jaxtrain.contrast.fx": ("FxConverted", "from_torch_fx"),
    "jaxtrain.contrast.state_dict": ("layout_of", "to_tensors"),
    "jaxtrain.contrast.torch_ops": None,
    "jaxtrain.contrast.seq_layers": ("BatchNorm",),
    # issue 15 (optimizers): PyTorch's update rules, schedules, plateau, constructor mapping
    "jaxtrain.contrast.spec": ("OptimizerSpec",),
    "jaxtrain.contrast.torch_rules": (
        "sgd_momentum_torch",
        "scale_by_adam_torch",
        "scale_by_rss_torch",
    ),
    "jaxtrain.contrast.schedules": ("onecycle",),
    "jaxtrain.contrast.plateau": ("with_plateau_lr",),
    "jaxtrain.contrast.torch_optim": ("spec_from_torch",),
    # issue 16 (tools): parameter EMA, profiler, model summary, learning-rate finder
    "jaxtrain.ema": None,
    "jaxtrain.profiler": None,
    "jaxtrain.summary": None,
    "jaxtrain.lr_find": None,
    "jaxtrain.apps.lr_find": ("LRFindConfig", "plot_lr_find"),
    # Exported flat before issue 12's split; each keeps its example under its module.
    "jaxtrain.data": (
        "load_digits",
        "digits_arrays",
        "stratified_split_indices",
        "train_test_split_stratified",
    ),
    "jaxtrain.trackers": None,
    "jaxtrain.precision": ("DynamicLossScale", "LossScaleState"),
    "jaxtrain.resident": ("put_dataset",),
    "jaxtrain.apps.tasks": None,
    "jaxtrain.apps.plots": ("plot_curves", "plot_runs"),
    "jaxtrain.apps.doctor": ("preflight",),
    "jaxtrain.population": None,
    "jaxtrain.population_step": None,
    "jaxtrain.population_fit": None,
    # issue 14 (CLI, plots): `jaxtrain train --population N`, population curves
    "jaxtrain.apps.population_run": ("members",),
    "jaxtrain.apps.population_plot": (
        "plot_population",
        "member_series",
        "best_of",
        "is_population",
    ),
    "jaxtrain.apps.fields": ("parse_values",),
}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_public(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return [n for n in names if not n.startswith("_")]
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    ]


def _public_objects() -> dict[str, object]:
    """Qualified name -> object, each object once (first name wins), documentable only.

    Plain data (e.g. ``jaxtrain.contrast.CORRESPONDENCE``, a tuple) cannot carry its own
    docstring, so only functions and classes are collected.
    """
    pairs: list[tuple[str, types.ModuleType, str]] = []
    for name in jaxtrain.__all__:
        if name.startswith("__"):
            continue
        value = getattr(jaxtrain, name)
        if isinstance(value, types.ModuleType):
            pairs += [(value.__name__, value, n) for n in _module_public(value)]
        else:
            pairs.append(("jaxtrain", jaxtrain, name))
    for modname, names in SUBMODULES.items():
        module = importlib.import_module(modname)
        for n in names if names is not None else _module_public(module):
            pairs.append((modname, module, n))
    found: dict[str, object] = {}
    seen: set[int] = set()
    for modname, module, name in pairs:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        found[f"{modname}.{name}"] = obj
    return found


PUBLIC = _public_objects()


def _own_examples(name: str, obj: object) -> list[doctest.Example]:
    """The examples in the object's own docstring (not its methods'), skipped ones out."""
    doc = obj.__doc__ or ""
    if "Example:" not in doc and "Examples:" not in doc:
        return []
    test = doctest.DocTestParser().get_doctest(doc, {}, name, None, 0)
    return [e for e in test.examples if not e.options.get(doctest.SKIP, False)]


def test_public_names_were_discovered():
    # A broken discovery (say, an empty __all__) must not pass the tests below vacuously.
    assert len(PUBLIC) >= 60, sorted(PUBLIC)
    for expected in ("jaxtrain.TrainState", "jaxtrain.make_train_step", "jaxtrain.losses.accuracy"):
        assert expected in PUBLIC, sorted(PUBLIC)


def test_every_public_name_has_an_example():
    offenders = [name for name, obj in PUBLIC.items() if not _own_examples(name, obj)]
    assert not offenders, (
        f"{len(offenders)} public names have no docstring with an 'Example:' section holding "
        "a doctest that runs (>>> lines, not all '# doctest: +SKIP'): "
        + ", ".join(offenders)
        + ". Fix: add a Google-style 'Example:' with a small CPU-fast doctest."
    )


def test_docstring_sections():
    # Google style: what goes in, what comes out. Classes describe their fields or
    # constructor arguments; functions that take arguments list them. The format of the
    # sections (and every parameter named in an existing Args:) is ruff's pydocstyle `D`
    # rules, Google convention (pyproject.toml). What stays here has no stable ruff rule:
    # D417 checks only an Args: section that exists, DOC201 (missing Returns:) is preview
    # only, and nothing asks a class for Args:/Attributes:.
    offenders = [miss for name, obj in PUBLIC.items() for miss in _missing_sections(name, obj)]
    assert not offenders, "docstrings missing sections: " + ", ".join(offenders)


def _missing_sections(name: str, obj: object) -> list[str]:
    """The Google sections ``obj``'s docstring lacks, as ``"name (no X:)"`` strings."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        # Only a class whose constructor takes arguments must describe them (or its
        # fields). A base class built without arguments (jaxtrain.Callback) documents its
        # methods' arguments under another heading: mkdocstrings --strict rejects an Args:
        # naming parameters the constructor does not have. A signature inspect cannot read
        # counts as taking arguments, so an unreadable class is still asked for a section.
        try:
            takes_args = bool(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            takes_args = True
        if takes_args and "Args:" not in doc and "Attributes:" not in doc:
            return [f"{name} (no Args:/Attributes:)"]
        return []
    missing = []
    params = [
        p
        for p in inspect.signature(obj).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if params and "Args:" not in doc:
        missing.append(f"{name} (no Args:)")
    if "Returns:" not in doc and "Yields:" not in doc:
        missing.append(f"{name} (no Returns:)")
    return missing


def test_docstring_sections_of_classes_follow_the_constructor():
    # The class rule of test_docstring_sections on made-up classes: relaxed for a
    # constructor without arguments, still strict for one with them (fields included).
    class Bare:
        """Built without arguments; its methods say what they take."""

    class Takes:
        """Takes a size, but says nothing of it."""

        def __init__(self, size: int):
            self.size = size

    @dataclasses.dataclass
    class Fields:
        """A dataclass: its fields are its constructor's arguments."""

        size: int

    class Described(Takes):
        """Takes a size.

        Args:
            size: how many.
        """

    class Variadic:
        """Takes anything, and says nothing of it."""

        def __init__(self, **options: object):
            self.options = options

    assert _missing_sections("Bare", Bare) == []
    assert _missing_sections("Described", Described) == []
    for cls in (Takes, Fields, Variadic):
        assert _missing_sections(cls.__name__, cls) == [f"{cls.__name__} (no Args:/Attributes:)"]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    obj = PUBLIC[name]
    # Examples that write files use tempfile; running in tmp_path keeps any stray
    # relative path out of the checkout as well.
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(recurse=True)
    # The defining module's globals, as ``python -m doctest`` gives them (a copy per test).
    module = inspect.getmodule(obj)
    tests = finder.find(obj, name, module=module, globs=dict(vars(module)))
    tests = [t for t in tests if t.examples]
    assert tests, f"{name} has no doctest: add an Example: section with >>> lines"
    output: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    failed = attempted = 0
    for test in tests:
        result = runner.run(test, out=output.append, clear_globs=True)
        failed += result.failed
        attempted += result.attempted
    assert failed == 0, f"doctest of {name} failed:\n" + "".join(output)
    assert attempted > 0
