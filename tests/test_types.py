"""The typing surface: one PyTree alias, the py.typed marker, and the typed defaults that
replaced None placeholders (so the type checker in .ci/run holds without casts)."""

import ast
import pathlib

import pytest

from jaxtrain import types
from jaxtrain.loop_state import History, LoopState
from jaxtrain.step import CompiledStep

PACKAGE = pathlib.Path(types.__file__).parent
ROOT = PACKAGE.parent


def _module_level_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_pytree_and_loss_fn_are_defined_only_in_jaxtrain_types():
    # Once there were five `PyTree = Any` (and a LossFn in step.py) that could drift apart.
    owners = {
        name: sorted(
            str(p.relative_to(PACKAGE))
            for p in PACKAGE.rglob("*.py")
            if name in _module_level_names(p)
        )
        for name in ("PyTree", "LossFn", "Batch")
    }
    assert owners == {"PyTree": ["types.py"], "LossFn": ["types.py"], "Batch": ["types.py"]}


def test_py_typed_marker_exists_and_is_packaged():
    # PEP 561: without the marker (installed with the package) users' type checkers
    # treat jaxtrain as untyped and every annotation here is invisible to them.
    assert (PACKAGE / "py.typed").is_file()
    # Text, not tomllib: that is Python 3.11+, and the package supports 3.10.
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")
    assert len(section) == 2, "pyproject.toml has no [tool.setuptools.package-data]"
    entry = next(
        ln for ln in section[1].split("\n[")[0].splitlines() if ln.startswith("jaxtrain =")
    )
    assert '"py.typed"' in entry, entry  # next to the data files the wheel carries


def test_compiled_step_without_a_body_says_so():
    step = CompiledStep(None, None, "train_step")
    with pytest.raises(RuntimeError, match=r"no step function.*Fix: build steps with"):
        step.jitted(1)
    with pytest.raises(RuntimeError, match=r"no step function"):
        step.fn(1)


def test_loop_state_made_outside_fit_has_an_empty_callback_list():
    # A callback that announces an event (the train log's on_log) works on a LoopState
    # built by hand (in a test or a user's harness), rather than failing on None.
    loop = LoopState(state=None, history=History())
    loop.callbacks.on_log(loop, {"step": 0})
    assert loop.callbacks.callbacks == []
