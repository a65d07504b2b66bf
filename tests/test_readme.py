"""The README cannot rot: its quick start is what CI runs, and its code blocks execute."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quickstart_lines():
    block = README.split("<!-- quickstart -->")[1].split("<!-- /quickstart -->")[0]
    return [ln for ln in block.strip().splitlines() if not ln.startswith("```")]


def test_quickstart_is_exactly_two_command_lines():
    lines = _quickstart_lines()
    assert len(lines) == 2, lines
    install_and_train, install_and_test = lines
    assert "pip install -e ." in install_and_train and "jaxtrain train" in install_and_train
    assert '".[test' in install_and_test and "pytest" in install_and_test
    assert "torch==2.13.0" in install_and_test  # the CPU build: parity tests must not skip
    assert install_and_test.index("torch==2.13.0") < install_and_test.index('".[test')
    # CI runs every tier (no -m marker selection) and names the 20 slowest tests.
    pytest_args = install_and_test.split("pytest", 1)[1].split()
    assert "-m" not in pytest_args and "--durations=20" in pytest_args, pytest_args


def test_ci_runs_the_readme_test_line():
    """.ci/run extracts line 2 of the quick start; check its extraction gives that line."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = next(ln for ln in script.splitlines() if ln.startswith("test_line=$("))
    cmd = extract[len("test_line=$(") : -1]
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _quickstart_lines()[1]
    assert 'eval "$test_line"' in script


@pytest.mark.parametrize("code", [0, 1, 5])
def test_ci_exits_with_the_test_line_status_no_tests_included(code):
    """pytest's exit 5 (no tests collected) fails CI like any other failure, with a word."""
    script = (ROOT / ".ci" / "run").read_text()
    tail = script[script.index('echo "+ $test_line"') :]
    res = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\ntest_line='(exit {code})'\n{tail}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == code, res
    assert ("collected no tests" in res.stderr) == (code == 5), res.stderr


def test_readme_python_blocks_run():
    """Runs the API tour and the fit block with fewer epochs (same code otherwise).

    The README is the front page: these two are its only python blocks. The guides' blocks
    (custom loss, callbacks, fused steps, checkpoints, ...) live in docs/ and run in
    tests/test_docs.py.
    """
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 2, f"the README's python blocks are the tour and fit; got {len(blocks)}"
    tour, fit_block = blocks
    assert "range(40)" in tour and "epochs=40" in fit_block
    code = tour.replace("range(40)", "range(2)") + fit_block.replace(
        "epochs=40,", "epochs=2, progress=False,"
    )
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert int(ns["state"].step) == 4 * 23  # 2 + 2 epochs of 23 steps
    assert ns["train_step"].trace_count == 1  # the tour's loop compiles its step once
    assert ns["history"].eval[-1]["accuracy"] > 0.8


@pytest.mark.unit
def test_readme_links_are_relative_and_exist():
    """Every Markdown link to a file of this repository resolves (GitHub renders them)."""
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [ln for ln in links if not re.match(r"[a-z]+://", ln)]
    assert len(local) >= 20, local  # the front page links into the docs
    for link in local:
        path = link.split("#")[0]
        assert not path.startswith("/"), f"README link {link!r} must be relative"
        assert (ROOT / path).is_file(), f"README links to {link!r}, which does not exist"


@pytest.mark.unit
def test_readme_is_a_front_page():
    """About 200 lines; the quick start, the five steps, the comparison, links into docs/."""
    assert len(README.splitlines()) <= 220, len(README.splitlines())
    for heading in ("## Quick start", "## The API in five steps", "## How jaxtrain compares"):
        assert heading in README, heading
    # The sections the docs site includes from the README (pymdownx.snippets markers).
    for section in ("diagram", "comparison"):
        assert README.count(f"--8<-- [start:{section}]") == 1, section
        assert README.count(f"--8<-- [end:{section}]") == 1, section
