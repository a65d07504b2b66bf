"""Every public name documents itself with a runnable example, and the example runs.

The names are discovered, not listed: everything in ``jaxtrain.__all__`` (modules in it are
expanded to their own public names), plus the public names of the submodules users import
directly. A name added to ``__all__`` without a docstring example fails
``test_every_public_name_has_an_example`` at once, listed by name.
"""

from __future__ import annotations

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
    "jaxtrain.apps.text": None,
    "jaxtrain.compile_cache": ("enable_compilation_cache",),
    "jaxtrain.perf": None,
    "jaxtrain.writers": None,
    "jaxtrain.contrast": None,
    # Exported flat before issue 12's split; each keeps its example under its module.
    "jaxtrain.data": ("load_digits",),
    "jaxtrain.precision": ("DynamicLossScale", "LossScaleState"),
    "jaxtrain.resident": ("put_dataset",),
    "jaxtrain.apps.tasks": None,
    "jaxtrain.apps.plots": ("plot_curves", "plot_runs"),
    "jaxtrain.apps.doctor": ("preflight",),
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
    offenders = []
    for name, obj in PUBLIC.items():
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            if "Args:" not in doc and "Attributes:" not in doc:
                offenders.append(f"{name} (no Args:/Attributes:)")
            continue
        params = [
            p
            for p in inspect.signature(obj).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if params and "Args:" not in doc:
            offenders.append(f"{name} (no Args:)")
        if "Returns:" not in doc and "Yields:" not in doc:
            offenders.append(f"{name} (no Returns:)")
    assert not offenders, "docstrings missing sections: " + ", ".join(offenders)


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
