"""Metric writers: one JSON object per line, written as records arrive."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Infinity; keep the information as text
    return v


class JsonlWriter:
    """Appends each record to ``path`` as one JSON line, flushed at once.

    Args:
        path: the file (its folder must exist and be writable).
        mode: ``"w"`` to start afresh, ``"a"`` to append (resume).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        self.path = os.fspath(path)
        self._f = open(self.path, mode, encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a metrics.jsonl file back into a list of dicts."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
