"""Test-wide settings: CPU only (the same results on every machine that runs CI) and tiers."""

import os
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No "compiling ..." notice (jaxtrain.perf.CompileNotice) in the tests' output: on a loaded
# 2-core machine a compile can pass its 5 s threshold, and tests that check a command's
# exact output (one-line errors) would see it. Its own tests set a threshold.
os.environ.setdefault("JAXTRAIN_COMPILE_NOTICE_SECONDS", "inf")
# One persistent XLA compilation cache for the whole session: the xdist workers and every
# subprocess (CLI runs, kill/resume, notebooks, multi-device scripts) inherit it, so the
# same step compiled again in another process is loaded instead (compiles dominate this
# suite's time on 2 cores). Only compilations over JAX's 1 s threshold are stored. The
# same program loads the same executable, so bitwise comparisons are unaffected; tests
# of the cache itself and the benchmarks' cold start set their own directories.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxtrain-xla-cache-"))


# --- Tiers -------------------------------------------------------------------------------
# Every test has exactly one tier (a marker, registered in pyproject.toml):
#   unit         in-process, no training beyond a few steps: the inner loop (`-m unit`);
#   integration  in-process tiny trainings (fit, fused steps, precision, tens of steps);
#   e2e          starts processes (the CLI as a subprocess, kill/resume, notebooks, examples,
#                multi-device and multi-host scripts, grain worker processes), whole
#                `jaxtrain train` runs in-process, everything compared against PyTorch
#                (jaxtrain.contrast), benchmark smoke runs, and trainings long by nature.
# The developer's fast command is `pytest -m "not e2e" -n 2 --dist loadgroup` (unit +
# integration); CI and the README's test line run all three tiers.
#
# A test's tier is the marker it carries (`@pytest.mark.e2e`, or `pytestmark` in its
# module), else its module's entry below, else `unit`. Two tier markers on one test are a
# collection error. Two guards keep the split honest as tests are added:
#   * a test outside e2e that starts a process (subprocess.Popen, multiprocessing) fails,
#     with the fix in the message;
#   * the end-of-session summary lists unit tests that ran over UNIT_BUDGET_S, which belong
#     in integration (a report, not a failure: timings depend on the machine's load).
# INTEGRATION_MODULES was recorded from such an audit (`--durations=0` on 2 cores): the
# modules whose tests mostly take over a second because they train.
import multiprocessing.process
import subprocess

import pytest

TIERS = ("unit", "integration", "e2e")
UNIT_BUDGET_S = 2.0

E2E_MODULES = {
    "test_benchmarks",  # benchmark smoke runs (subprocesses, PyTorch, torch.compile)
    "test_compile_cache",  # a second process reusing the cache
    "test_contrast_compare",  # PyTorch parity: compare() on BatchNorm/fx models, usage errors
    "test_contrast_convert",  # PyTorch parity: layer outputs of converted twins
    "test_contrast_examples",  # the teaching examples as scripts
    "test_contrast_init",  # PyTorch parity: initialisers against PyTorch's samples
    "test_contrast_models",  # PyTorch parity: more layers, fx ResNet, state_dict round trip
    "test_contrast_optim",  # PyTorch parity: optimizer updates and schedules
    "test_contrast_optimizers",  # PyTorch parity: RMSprop/Adagrad/amsgrad/..., float64 runs
    "test_contrast_parity",  # PyTorch parity runs (200 steps per optimizer and model)
    "test_contrast_teaching",  # PyTorch side by side: step anatomy, a forgotten zero_grad
    "test_docs",  # every docs page's python blocks (trainings), mkdocs build as a subprocess
    "test_examples",  # examples/ as scripts
    "test_fsdp",  # 8 virtual devices in a subprocess
    "test_kill_resume",  # SIGKILL / SIGTERM and bitwise resume
    "test_multidevice",  # 8 virtual devices in a subprocess
    "test_multihost",  # two processes on 127.0.0.1
    "test_notebooks",  # every notebook executed
    "test_population_fit",  # population trainings under fit, a checkpoint resume
    "test_population_cli_e2e",  # `jaxtrain train --population`: summary, bitwise resume, plot
    "test_readme",  # the README's quick start and tour
    "test_run_folder",  # the run-folder rules through whole `jaxtrain train` runs
    "test_tools_e2e",  # `jaxtrain lr-find` + a digits training at its suggestion; CLI runs
    "test_sharded",  # sharded init/checkpoints: 8 virtual devices, 2 processes, SIGKILL
    "test_trackers",  # real MLflow/W&B runs (W&B starts its service process), a train run
}

INTEGRATION_MODULES = {
    "test_adapters",  # linen / NNX / plain models each trained end to end
    "test_fused",  # K fused steps and device epochs against single steps
    "test_grad_accum",  # accumulation against one big batch
    "test_grain",  # grain pipelines through fit, resume
    "test_nonfinite",  # the guard inside trainings
    "test_plot",  # plots of two real runs
    "test_precision",  # mixed precision trainings
    "test_progress",  # throughput and progress of real runs
    "test_text",  # the char LM trained a few steps
    "test_traps",  # research-loop traps, each a short training
    "test_writers",  # writers fed by real runs
}


def _module(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


def pytest_collection_modifyitems(config, items):
    # Before the -m selection (pytest's mark plugin runs after conftest hooks).
    errors = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) > 1:
            errors.append(f"{item.nodeid} has tiers {sorted(tiers)}; keep exactly one")
            continue
        if tiers:
            continue
        module = _module(item)
        if module in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
        elif module in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
    if errors:
        raise pytest.UsageError("\n".join(errors))
    if getattr(getattr(config, "option", None), "loadgroup", False):
        for item in items:
            _restore_xdist_group(item)


def _restore_xdist_group(item):
    """Makes `--dist loadgroup` group again under pytest 9 (on the xdist workers).

    pytest-xdist 3.8 sends the tests of one `xdist_group` to one worker by appending
    ``@group`` to ``item._nodeid``, which pytest 9.2 no longer reads (the id lives in
    ``item._id``): every group was silently split across the workers, so module fixtures
    (a notebook's execution, the examples' runs, two trainings to plot) ran on each
    worker. This appends the suffix where pytest reads it; tests/test_tiers.py checks it.
    """
    names = {
        str(m.args[0] if m.args else m.kwargs.get("name", "default"))
        for m in item.iter_markers("xdist_group")
    }
    if names and "@" not in item.nodeid and hasattr(item, "_id"):
        item._id = type(item._id).parse(f"{item.nodeid}@{'_'.join(sorted(names))}")


@pytest.fixture(autouse=True)
def _only_e2e_starts_processes(request, monkeypatch):
    if request.node.get_closest_marker("e2e") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} starts a process but is not in the e2e tier. Fix: mark "
            "it @pytest.mark.e2e (or list its module in tests/conftest.py E2E_MODULES), or "
            "test the behaviour in-process."
        )

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


def pytest_terminal_summary(terminalreporter):
    slow_units = sorted(
        (r.duration, r.nodeid)
        for r in terminalreporter.stats.get("passed", [])
        if r.when == "call" and "unit" in r.keywords and r.duration > UNIT_BUDGET_S
    )
    if slow_units:
        terminalreporter.section("unit tests over the unit budget")
        terminalreporter.write_line(
            f"{len(slow_units)} unit test(s) ran over {UNIT_BUDGET_S:.0f} s; if they do on a "
            "quiet machine, mark them @pytest.mark.integration (tests/conftest.py):"
        )
        for duration, nodeid in reversed(slow_units):
            terminalreporter.write_line(f"  {duration:6.2f}s {nodeid}")
