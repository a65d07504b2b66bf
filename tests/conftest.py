"""Test-wide settings: CPU only, so results are the same on every machine that runs CI."""

import os
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole session: the xdist workers and every
# subprocess (CLI runs, kill/resume, notebooks, multi-device scripts) inherit it, so the
# same step compiled again in another process is loaded instead (compiles dominate this
# suite's time on 2 cores). Only compilations over JAX's 1 s threshold are stored. The
# same program loads the same executable, so bitwise comparisons are unaffected; tests
# of the cache itself and the benchmarks' cold start set their own directories.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxtrain-xla-cache-"))


# --- Tiers -------------------------------------------------------------------------------
# The fast tier, `pytest -m "not slow"`, is the inner loop: no subprocesses, notebooks or
# long trainings. A test is slow when its module is listed here or it carries
# `@pytest.mark.slow`; the guard below fails any test outside the slow tier that starts a
# subprocess, so the split cannot rot silently as tests are added.
import subprocess

import pytest

SLOW_MODULES = {
    "test_benchmarks",  # benchmark smoke runs (subprocesses, PyTorch, torch.compile)
    "test_compile_cache",  # a second process reusing the cache
    "test_contrast_examples",  # the teaching examples as scripts
    "test_examples",  # examples/ as scripts
    "test_fsdp",  # 8 virtual devices in a subprocess
    "test_kill_resume",  # SIGKILL / SIGTERM and bitwise resume
    "test_multidevice",  # 8 virtual devices in a subprocess
    "test_multihost",  # two processes on 127.0.0.1
    "test_notebooks",  # every notebook executed
    "test_readme",  # the README's quick start and tour
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} starts a subprocess but is in the fast tier. Fix: mark it "
            "@pytest.mark.slow (or list its module in tests/conftest.py SLOW_MODULES)."
        )

    monkeypatch.setattr(subprocess, "Popen", refuse)
