"""Writes one API reference page per public module, and the nav's API section.

    .venv/bin/python docs/hooks/api_pages.py

A public module is every module of the ``jaxtrain`` package whose dotted name has no part
starting with ``_``. A missing page is created as ``# `module``` and ``::: module``
(mkdocstrings renders the module from its docstrings); a generated page whose module is
gone is removed (a page someone extended is kept, and the build then names it). The
``API reference`` section closing ``mkdocs.yml``'s nav is rewritten to list every page.
``tests/test_docs.py`` checks that each public module has its page, in the nav.
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
API = ROOT / "docs" / "api"
NAV_HEAD = "  - API reference:\n"


def public_modules() -> list[str]:
    """``jaxtrain`` and every public module under it, by dotted name (found on disk).

    Read from the source tree rather than imported, so listing them loads neither JAX nor
    an optional extra: the package directories with an ``__init__.py``, and their modules.
    """
    package = ROOT / "jaxtrain"
    found = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        packages = [ROOT.joinpath(*parts[:i]) for i in range(1, len(parts))]
        if any(part.startswith("_") for part in parts) or not all(
            (d / "__init__.py").exists() for d in packages
        ):
            continue
        found.append(".".join(parts))
    return found


def page_text(module: str) -> str:
    """The generated page of ``module``."""
    return f"# `{module}`\n\n::: {module}\n"


def main() -> None:
    """Creates missing pages, removes stale generated ones, rewrites the nav section."""
    modules = public_modules()
    for module in modules:
        page = API / f"{module}.md"
        if not page.exists():
            page.write_text(page_text(module))
            print("created", page.relative_to(ROOT))
    for page in API.glob("*.md"):
        if page.stem not in modules and page.read_text() == page_text(page.stem):
            page.unlink()
            print("removed", page.relative_to(ROOT))
    pages = sorted(p.stem for p in API.glob("*.md") if p.stem != "jaxtrain")
    config = ROOT / "mkdocs.yml"
    text = config.read_text()
    head = text[: text.index(NAV_HEAD)]  # the API section closes the nav and the file
    entries = "".join(f"      - {m}: api/{m}.md\n" for m in ["jaxtrain", *pages])
    config.write_text(head + NAV_HEAD + entries)


if __name__ == "__main__":
    main()
