"""The test tiers (tests/conftest.py): one tier per test, and only e2e tests start processes."""

import multiprocessing
import subprocess
import sys
import types
from pathlib import Path

import conftest
import pytest


class _Item:
    """The part of a pytest item that the tier assignment reads and writes."""

    def __init__(self, module, *marks):
        self.module = types.SimpleNamespace(__name__=f"tests.{module}")
        self.nodeid = f"tests/{module}.py::test_x"
        self.marks = [m.mark for m in marks]

    def iter_markers(self):
        return iter(self.marks)

    def add_marker(self, mark):
        self.marks.append(mark.mark)

    def tiers(self):
        return [m.name for m in self.marks if m.name in conftest.TIERS]


def test_every_test_gets_exactly_one_tier():
    items = {
        "e2e": _Item("test_kill_resume"),
        "integration": _Item("test_fused"),
        "unit": _Item("test_losses"),
        "marked": _Item("test_fused", pytest.mark.e2e),
    }
    conftest.pytest_collection_modifyitems(None, list(items.values()))
    assert {k: item.tiers() for k, item in items.items()} == {
        "e2e": ["e2e"],
        "integration": ["integration"],
        "unit": ["unit"],
        "marked": ["e2e"],  # the test's own marker wins over its module's tier
    }
    with pytest.raises(
        pytest.UsageError,
        match=r"tests/test_losses.py::test_x has tiers \['e2e', 'unit'\]; keep exactly one",
    ):
        conftest.pytest_collection_modifyitems(
            None, [_Item("test_losses", pytest.mark.unit, pytest.mark.e2e)]
        )


def test_this_test_is_unit(request):
    tiers = [m.name for m in request.node.iter_markers() if m.name in conftest.TIERS]
    assert tiers == ["unit"]


def test_module_lists_name_existing_test_files():
    """A renamed or deleted module would silently drop out of its tier."""
    here = Path(__file__).parent
    listed = conftest.E2E_MODULES | conftest.INTEGRATION_MODULES
    assert not conftest.E2E_MODULES & conftest.INTEGRATION_MODULES
    assert sorted(m for m in listed if not (here / f"{m}.py").is_file()) == []


def test_a_process_outside_e2e_fails_with_the_fix(request):
    fix = (
        rf"{request.node.nodeid} starts a process but is not in the e2e tier\. Fix: mark it "
        r"@pytest\.mark\.e2e \(or list its module in tests/conftest\.py E2E_MODULES\)"
    )
    with pytest.raises(AssertionError, match=fix):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(AssertionError, match=fix):
        multiprocessing.get_context("spawn").Process(target=print).start()


@pytest.mark.xdist_group("test_tiers")
def test_xdist_groups_reach_the_scheduler(request):
    """`--dist loadgroup` sees each group (pytest 9 reads the id from ``item._id``)."""
    node_id = type(request.node._id)

    class Item:
        def __init__(self):
            self._id = node_id.parse("tests/test_x.py::test_y[1]")

        nodeid = property(lambda self: str(self._id))

        def iter_markers(self, name=None):
            return iter([pytest.mark.xdist_group("g").mark])

    item = Item()
    conftest._restore_xdist_group(item)
    assert item.nodeid == "tests/test_x.py::test_y[1]@g"
    if getattr(request.config.option, "loadgroup", False):  # this run, on an xdist worker
        assert request.node.nodeid.endswith("@test_tiers"), request.node.nodeid
