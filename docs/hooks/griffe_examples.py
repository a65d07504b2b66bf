"""A griffe extension for the API reference: two docstring habits griffe does not parse.

* ``Example:`` sections render as code. jaxtrain's docstrings head their doctests
  ``Example:`` (singular, as the project's docstring rule and ruff's Google convention
  accept); griffe's Google parser knows only ``Examples:`` as a section of ``>>>`` code
  and would render ``Example:`` as an admonition of plain prose, where ``d["key"]`` reads
  as a Markdown link.
* Grouped arguments, ``start, peak, end: the values at the phase boundaries.`` (a name
  list that may continue on the next line), become one entry per name with the shared
  description, so griffe checks every name against the signature.

Only the text griffe parses is rewritten, never the source.
"""

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ARGS_HEADER = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Other Parameters|Attributes):\s*$"
)
_NAMES = r"[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*"
_GROUP = re.compile(rf"^(?P<names>{_NAMES}\s*,\s*[A-Za-z_]\w*)\s*:(?P<desc>.*)$")
_OPEN_GROUP = re.compile(rf"^{_NAMES}\s*,\s*$")  # a name list continued on the next line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_args(text: str) -> str:
    """Rewrites ``a, b: desc`` entries of argument sections into one entry per name.

    Args:
        text: a docstring.

    Returns:
        The docstring with every grouped entry (its continuation lines included) repeated
        once per name; everything else unchanged.
    """
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        header = _ARGS_HEADER.match(lines[i])
        out.append(lines[i])
        i += 1
        if not header:
            continue
        base = len(header[1])
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            line, entry_indent = lines[i], _indent(lines[i])
            head, j = line.strip(), i + 1
            while _OPEN_GROUP.match(head) and j < len(lines) and _indent(lines[j]) > entry_indent:
                head, j = f"{head} {lines[j].strip()}", j + 1
            group = _GROUP.match(head) if line.strip() else None
            if not group:
                out.append(line)
                i += 1
                continue
            body = []
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > entry_indent:
                body.append(lines[j])
                j += 1
            for name in re.split(r"\s*,\s*", group["names"]):
                out.append(f"{' ' * entry_indent}{name}:{group['desc']}")
                out.extend(body)
            i = j
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


class ExampleSections(griffe.Extension):
    """Renames ``Example:`` to ``Examples:`` and splits grouped argument entries."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrites the docstring once the object tree is complete, before any parse."""
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = split_grouped_args(text)
