"""The documentation site cannot rot: its code runs, its build is strict, its nav complete.

Convention for ```python blocks in ``docs/*.md`` (every page, whoever writes it):

* A page's python blocks run in order, as one program: one namespace per page, so a block
  continues the blocks above it on the same page (never another page's). The working
  directory is a fresh temporary folder, so files a block writes go nowhere.
* Anything that cannot run in-process, or should not run in the tests, is fenced as
  ```bash, ```text, ```console, ... instead (only ``python`` blocks are executed).
* A block may be run with test-sized settings: an HTML comment on the line just before
  its fence, ``<!-- test {"replace": {"epochs=40,": "epochs=2, progress=False,"}} -->``,
  replaces each key by its value in the executed code (the page shows the real value).
  Each key must occur in the block, so an edit to the block cannot leave the
  replacement silently doing nothing.
* A page may add assertions on its final namespace in `PAGE_CHECKS` below.

Running pages (they train models) is e2e; the structural checks (nav, API pages,
directives) are unit.
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test\s+(?P<json>\{.*\})\s*-->\s*$")
_DIRECTIVE_KEYS = {"replace"}


def _pages() -> list[pathlib.Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


def python_blocks(text: str, name: str = "page") -> list[tuple[int, str]]:
    """The ``python`` blocks of a Markdown page as ``(line, code)``, directives applied.

    Args:
        text: the page's Markdown.
        name: the page's name, for error messages.

    Returns:
        ``(1-based line of the opening fence, dedented code with replacements made)``,
        in page order. Fences nested inside other fences are content, not blocks.

    Raises:
        ValueError: a directive that is not valid JSON, has unknown keys, is not followed
            by a python block, or replaces text its block does not contain.
    """
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    pending: tuple[int, dict] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        if directive:
            try:
                spec = json.loads(directive["json"])
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{name}:{i + 1}: the test directive is not valid JSON ({e}): {line.strip()}"
                ) from None
            unknown = set(spec) - _DIRECTIVE_KEYS
            if unknown:
                raise ValueError(
                    f"{name}:{i + 1}: unknown test directive key(s) {sorted(unknown)}; "
                    f"expected {sorted(_DIRECTIVE_KEYS)}"
                )
            pending = (i + 1, spec)
            i += 1
            continue
        opened = _FENCE_OPEN.match(line)
        if not opened:
            if pending is not None and line.strip():
                raise ValueError(
                    f"{name}:{pending[0]}: a test directive must be on the line just before "
                    "a ```python fence"
                )
            i += 1
            continue
        fence, lang = opened["fence"], opened["lang"]
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = textwrap.dedent("\n".join(lines[i + 1 : j])) + "\n"
        if pending is not None:
            if lang != "python":
                raise ValueError(
                    f"{name}:{pending[0]}: a test directive must precede a ```python block, "
                    f"not ```{lang}"
                )
            for old, new in pending[1].get("replace", {}).items():
                if old not in body:
                    raise ValueError(
                        f"{name}:{pending[0]}: the test directive replaces {old!r}, which the "
                        f"block at line {i + 1} does not contain; update the directive"
                    )
                body = body.replace(old, new)
            pending = None
        if lang == "python":
            blocks.append((i + 1, body))
        i = j + 1
    if pending is not None:
        raise ValueError(f"{name}:{pending[0]}: a test directive at the end of the page")
    return blocks


def run_page(path: pathlib.Path) -> dict:
    """Executes a page's python blocks in order in one namespace; returns the namespace."""
    name = str(path.relative_to(ROOT))
    ns: dict = {"__name__": "__docs__"}
    for line, code in python_blocks(path.read_text(), name):
        # Pad with blank lines so a traceback's line numbers are the page's.
        exec(compile("\n" * line + code, name, "exec"), ns)
    return ns


def _check_getting_started(ns):
    assert int(ns["state"].step) == 3 * 23 + 1  # 2 epochs by hand, 1 by fit, 1 custom step
    assert ns["train_step"].trace_count == 1  # the loop compiled its step once
    assert ns["history"].eval[-1]["accuracy"] > 0.8
    assert {"loss", "accuracy", "grad_norm"} <= set(ns["metrics"])


def _check_checkpoints(ns):
    steps = sorted(int(p.name) for p in pathlib.Path("ckpts").iterdir() if p.name.isdigit())
    assert steps[-1] == int(ns["state"].step) and steps, steps


def _check_speed(ns):
    assert ns["train_steps"].steps_per_call == 8


PAGE_CHECKS = {
    "getting-started.md": _check_getting_started,
    "checkpoints.md": _check_checkpoints,
    "speed.md": _check_speed,
}

RUNNABLE = [p for p in _pages() if python_blocks(p.read_text(), p.name)]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(DOCS)) for p in RUNNABLE])
def test_page_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_page(page)
    check = PAGE_CHECKS.get(str(page.relative_to(DOCS)))
    if check is not None:
        check(ns)


@pytest.mark.unit
def test_page_checks_name_runnable_pages():
    runnable = {str(p.relative_to(DOCS)) for p in RUNNABLE}
    assert set(PAGE_CHECKS) <= runnable, set(PAGE_CHECKS) - runnable


@pytest.mark.unit
def test_directives_are_applied_and_checked():
    page = (
        'Text.\n<!-- test {"replace": {"epochs=40": "epochs=2"}} -->\n'
        "```python\nfit(epochs=40)\n```\n\n```bash\nrm -rf /\n```\n"
        "- item\n\n    ```python\n    x = 1\n    ```\n"
    )
    assert python_blocks(page) == [(3, "fit(epochs=2)\n"), (12, "x = 1\n")]
    stale = page.replace('"epochs=40"', '"epochs=50"')
    with pytest.raises(ValueError, match=r"page:2: the test directive replaces 'epochs=50'"):
        python_blocks(stale)
    with pytest.raises(ValueError, match=r"unknown test directive key\(s\) \['skip'\]"):
        python_blocks('<!-- test {"skip": true} -->\n```python\nx\n```\n')
    with pytest.raises(ValueError, match="must precede a ```python block, not ```bash"):
        python_blocks('<!-- test {"replace": {}} -->\n```bash\nx\n```\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        python_blocks("<!-- test {replace} -->\n```python\nx\n```\n")


@pytest.mark.unit
def test_api_reference_docstring_rewrites():
    """The griffe extension: grouped arguments split (each name then checked), examples code."""
    spec = importlib.util.spec_from_file_location(
        "griffe_examples", DOCS / "hooks" / "griffe_examples.py"
    )
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    doc = (
        "Summary.\n\nArgs:\n    x: one.\n    start, peak,\n        end: the values\n"
        "            at the boundaries.\n\nReturns:\n    a, b: not arguments.\n"
    )
    assert ext.split_grouped_args(doc) == (
        "Summary.\n\nArgs:\n    x: one.\n"
        "    start: the values\n            at the boundaries.\n"
        "    peak: the values\n            at the boundaries.\n"
        "    end: the values\n            at the boundaries.\n"
        "\nReturns:\n    a, b: not arguments.\n"
    )
    assert ext._EXAMPLE.sub(r"\1Examples:", "Text.\n\n    Example:\n        >>> 1\n") == (
        "Text.\n\n    Examples:\n        >>> 1\n"
    )


def _nav_paths(nav) -> list[str]:
    out: list[str] = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend([value] if isinstance(value, str) else _nav_paths(value))
    return out


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


@pytest.mark.unit
def test_every_page_is_in_the_nav_once():
    nav = _nav_paths(_config()["nav"])
    pages = {str(p.relative_to(DOCS)) for p in _pages()}
    missing = sorted(pages - set(nav))
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}; add them"
    dangling = sorted(set(nav) - pages)
    assert not dangling, f"mkdocs.yml's nav names pages that do not exist: {dangling}"
    assert len(nav) == len(set(nav)), sorted(p for p in nav if nav.count(p) > 1)


def _public_modules() -> list[str]:
    """The modules `docs/hooks/api_pages.py` writes pages for (one definition of public)."""
    spec = importlib.util.spec_from_file_location("api_pages", DOCS / "hooks" / "api_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.public_modules()


@pytest.mark.unit
def test_every_public_module_has_an_api_page():
    for module in _public_modules():
        page = DOCS / "api" / f"{module}.md"
        assert page.exists() and f"\n::: {module}\n" in page.read_text(), (
            f"no API reference page for {module}: run `python docs/hooks/api_pages.py` "
            f"(it writes docs/api/{module}.md and the nav's API section)"
        )


@pytest.mark.e2e
def test_mkdocs_build_is_strict_and_succeeds(tmp_path):
    assert _config()["strict"] is True
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "api" / "jaxtrain.step" / "index.html").exists()
    html = (tmp_path / "api" / "jaxtrain.step" / "index.html").read_text()
    assert "make_train_step" in html  # the reference is generated from the docstrings
