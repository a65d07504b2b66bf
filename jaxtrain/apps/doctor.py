"""``jaxtrain doctor`` and `preflight`: what JAX will run on, before a long run starts.

The most common notebook failure is silent: a Colab TPU runtime (or a GPU machine) whose
JAX cannot reach the accelerator quietly runs everything on the CPU, a hundred times
slower. `preflight` reports the backend, the devices (kind and memory), the process
count, the library versions and the default matmul precision, and prints a loud warning
when an accelerator was expected — asked for with ``expect=``, or hinted at by the
environment (``COLAB_TPU_ADDR``, ``TPU_NAME``, ``NVIDIA_VISIBLE_DEVICES``,
``CUDA_VISIBLE_DEVICES``, ...) — but JAX fell back to the CPU.

Example:
    >>> import jaxtrain
    >>> report = jaxtrain.apps.doctor.preflight(verbose=False)
    >>> report["backend"] in ("cpu", "gpu", "tpu")
    True

What must not live here: anything a training run needs (this only reports). Part of
`jaxtrain.apps`: the core never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from collections.abc import Mapping
from typing import Any, TextIO

COMMAND = "doctor"
EXPECT_CHOICES = ("cpu", "gpu", "tpu")

# Environment variables that say an accelerator should be there, in the order checked.
# A value in _NO_DEVICE (e.g. CUDA_VISIBLE_DEVICES="" or "-1") means "none", not a hint.
TPU_HINTS = ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")
GPU_HINTS = ("COLAB_GPU", "NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
_NO_DEVICE = ("", "-1", "none", "void", "no", "0:none")

PRECISION_NOTES = {
    "tpu": (
        "on TPU, float32 matmuls and convolutions at the 'default' precision run as ONE "
        "bfloat16 pass (about 3 significant digits, 8-bit mantissa); 'high' uses 3 bfloat16 "
        "passes (close to float32), 'highest' full float32 (about 6 passes, slowest)"
    ),
    "gpu": (
        "on GPU, float32 matmuls at the 'default' precision may use TF32 tensor cores on "
        "Ampere and newer (10-bit mantissa); 'highest' forces true float32"
    ),
    "cpu": "on CPU, float32 matmuls are computed in float32 at every precision setting",
}
PRECISION_FIX = (
    "set it with jax.config.update('jax_default_matmul_precision', 'highest') or the "
    "environment variable JAX_DEFAULT_MATMUL_PRECISION=highest (per call: "
    "jnp.dot(..., precision='highest'))"
)


def _accelerator_hint(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(kind, reason)`` from the environment, e.g. ``("tpu", "COLAB_TPU_ADDR is set")``."""
    for kind, names in (("tpu", TPU_HINTS), ("gpu", GPU_HINTS)):
        for name in names:
            value = env.get(name)
            if value is not None and value.strip().lower() not in _NO_DEVICE:
                return kind, f"{name}={value!r} is set"
    return None, None


def _format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.1f} GiB"


def _device_info(d: Any) -> dict[str, Any]:
    """One device as plain data; memory from ``memory_stats()`` where the backend has it."""
    stats = None
    try:
        stats = d.memory_stats()
    except Exception:  # some backends and versions raise instead of returning None
        stats = None
    limit = None
    if isinstance(stats, Mapping):
        limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    return {
        "id": int(d.id),
        "platform": d.platform,
        "kind": d.device_kind,
        "process_index": int(getattr(d, "process_index", 0)),
        "memory_bytes": int(limit) if limit else None,
        "memory": _format_bytes(int(limit)) if limit else "unknown",
        "memory_in_use_bytes": int(stats["bytes_in_use"])
        if isinstance(stats, Mapping) and "bytes_in_use" in stats
        else None,
    }


def _fallback_message(expected: str, backend: str, reason: str, env: Mapping[str, str]) -> str:
    name = {"tpu": "a TPU", "gpu": "a GPU", "cpu": "the CPU"}[expected]
    first = f"{name[0].upper()}{name[1:]} was expected ({reason}) but JAX is running on {backend.upper()}"
    if backend == "cpu":
        first += ": every step will run there, typically 10-100x slower than on the accelerator"
    lines = [first + "."]
    forced = env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME")
    if forced:
        lines.append(
            f"JAX_PLATFORMS={forced!r} is set in the environment and restricts JAX to it; "
            "unset it (or include the accelerator) and restart Python."
        )
    if expected == "tpu":
        lines.append(
            "Fix: on Colab choose Runtime > Change runtime type > TPU and restart the "
            "session; elsewhere install the TPU build with pip install -U 'jax[tpu]' and "
            "restart Python. Check with: python -c 'import jax; print(jax.devices())'."
        )
    elif expected == "gpu":
        lines.append(
            "Fix: install a CUDA build of JAX matching the driver, e.g. pip install -U "
            "'jax[cuda12]' (or 'jax[cuda13]'), restart Python, and check nvidia-smi and "
            "python -c 'import jax; print(jax.devices())'."
        )
    else:
        lines.append("Fix: set JAX_PLATFORMS=cpu to run on the CPU on purpose.")
    return "\n".join(lines)


def _banner(text: str) -> str:
    bar = "!" * 78
    wrapped = [w for line in text.splitlines() for w in textwrap.wrap(line, 74)]
    body = "\n".join(f"!! {line}" for line in wrapped)
    return f"{bar}\n!! WARNING: JAX IS NOT RUNNING WHERE EXPECTED\n{body}\n{bar}"


def preflight(
    expect: str | None = None,
    *,
    verbose: bool = True,
    strict: bool = False,
    env: Mapping[str, str] | None = None,
    file: TextIO | None = None,
) -> dict[str, Any]:
    """Reports what JAX runs on, and warns loudly when an accelerator is missing.

    Call it in the first cell of a notebook, or run ``jaxtrain doctor``. The expected
    platform is ``expect`` when given, else a hint from the environment
    (``COLAB_TPU_ADDR``, ``TPU_NAME``, ``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_HOSTNAMES``
    mean TPU; ``COLAB_GPU``, ``NVIDIA_VISIBLE_DEVICES``, ``CUDA_VISIBLE_DEVICES`` mean
    GPU; values such as ``""``, ``"-1"``, ``"none"``, ``"void"`` mean no device), else
    nothing is expected. When the backend differs from the expected one, the report gets
    a warning (printed as a banner of ``!`` when ``verbose``, else emitted with
    `warnings.warn`) and ``ok`` is False. A hint from the environment is not acted on
    when ``JAX_PLATFORMS`` restricts JAX on purpose.

    Args:
        expect: ``"tpu"``, ``"gpu"``, ``"cpu"`` or None (use the environment's hints).
        verbose: print the report to ``file``.
        strict: raise `RuntimeError` (with the warning text) instead of only warning.
        env: the environment to read hints from (default ``os.environ``; for tests).
        file: where to print (default ``sys.stdout``).

    Returns:
        A JSON-ready dict: ``backend`` (``"cpu"|"gpu"|"tpu"``), ``devices`` (a list of
        ``{"id", "platform", "kind", "process_index", "memory_bytes", "memory",
        "memory_in_use_bytes"}``; ``memory`` is e.g. ``"15.7 GiB"`` or ``"unknown"``),
        ``device_count``, ``local_device_count``, ``process_count``, ``process_index``,
        ``versions``, ``matmul_precision`` (``"default"``, ``"high"``, ``"highest"``,
        ...), ``matmul_precision_note`` (what it means on this backend),
        ``matmul_precision_on_tpu``, ``expected``, ``expected_reason``,
        ``fell_back_to_cpu``, ``warnings`` (list of str) and ``ok``.

    Raises:
        ValueError: ``expect`` is not one of ``"tpu"``, ``"gpu"``, ``"cpu"``, None.
        RuntimeError: ``strict=True`` and the expected platform is not the backend.

    Example:
        >>> report = preflight(verbose=False)  # verbose=True prints it
        >>> report["backend"] in ("cpu", "gpu", "tpu"), len(report["devices"]) >= 1
        (True, True)
        >>> report = preflight(expect="cpu", verbose=False)  # doctest: +SKIP
        >>> report["backend"], report["devices"][0]["kind"], report["ok"]  # doctest: +SKIP
        ('cpu', 'cpu', True)
    """
    _check_expect(expect)
    env = os.environ if env is None else env
    report = _report(*_expectation(expect, env), env)
    if verbose:
        print(format_report(report), file=file or sys.stdout, flush=True)
    if strict and report["warnings"]:
        raise RuntimeError(report["warnings"][0])
    if not verbose:
        for w in report["warnings"]:
            warnings.warn(w, RuntimeWarning, stacklevel=2)  # points at preflight's caller
    return report


def _check_expect(expect: str | None) -> None:
    """Raises ``ValueError`` unless ``expect`` is one of `EXPECT_CHOICES` or None."""
    if expect is not None and expect not in EXPECT_CHOICES:
        raise ValueError(
            f"expect must be one of {', '.join(repr(c) for c in EXPECT_CHOICES)} or None; "
            f"got {expect!r}. Fix: preflight(expect='tpu') on a TPU runtime, or leave it "
            "unset to read hints from the environment."
        )


def _expectation(expect: str | None, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(expected platform, why)``: ``expect`` when given, else the environment's hint.

    A hint is dropped when ``JAX_PLATFORMS`` restricts JAX to chosen platforms on purpose.
    """
    if expect is not None:
        return expect, f"expect={expect!r}"
    expected, reason = _accelerator_hint(env)
    if expected is not None and (env.get("JAX_PLATFORMS") or "").strip():
        return None, None
    return expected, reason


def _report(expected: str | None, reason: str | None, env: Mapping[str, str]) -> dict[str, Any]:
    """The `preflight` report of this process for the ``expected`` platform."""
    import jax

    from jaxtrain.versions import versions

    backend = jax.default_backend()
    devices = [_device_info(d) for d in jax.devices()]
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]  # a flag jax's Config stub lacks
    report_warnings = []
    if expected is not None and reason is not None and expected != backend:
        report_warnings.append(_fallback_message(expected, backend, reason, env))
    return {
        "backend": backend,
        "devices": devices,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "versions": versions(),
        "matmul_precision": "default" if precision is None else str(precision).lower(),
        "matmul_precision_note": PRECISION_NOTES.get(backend, PRECISION_NOTES["cpu"]),
        "matmul_precision_on_tpu": PRECISION_NOTES["tpu"],
        "expected": expected,
        "expected_reason": reason,
        "fell_back_to_cpu": expected in ("tpu", "gpu") and backend == "cpu",
        "warnings": report_warnings,
        "ok": not report_warnings,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The human-readable text of a `preflight` report (what ``jaxtrain doctor`` prints)."""
    lines = []
    for w in report["warnings"]:
        lines += [_banner(w), ""]
    lines.append(
        f"backend: {report['backend']}  ({report['device_count']} device(s), "
        f"{report['local_device_count']} local; process {report['process_index']} of "
        f"{report['process_count']})"
    )
    for d in report["devices"]:
        used = (
            f", {_format_bytes(d['memory_in_use_bytes'])} in use"
            if d["memory_in_use_bytes"] is not None and d["memory_bytes"] is not None
            else ""
        )
        lines.append(
            f"  device {d['id']}: {d['platform']} {d['kind']!r}, memory {d['memory']}{used}"
            f" (process {d['process_index']})"
        )
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    lines.append(f"default matmul precision: {report['matmul_precision']}")
    lines.append(f"  {report['matmul_precision_note']}")
    if report["backend"] != "tpu":
        lines.append(f"  {report['matmul_precision_on_tpu']}")
    lines.append(f"  {PRECISION_FIX}")
    if report["expected"] is None:
        lines.append("expected platform: none (pass --expect tpu|gpu to check for one)")
    else:
        verdict = "OK" if report["ok"] else "NOT FOUND"
        lines.append(
            f"expected platform: {report['expected']} ({report['expected_reason']}): {verdict}"
        )
    return "\n".join(lines)


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``doctor`` subcommand to ``jaxtrain``'s subparsers.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``doctor`` parser (run it with `run_doctor`).
    """
    p = subparsers.add_parser(
        COMMAND,
        help="report JAX's backend, devices, versions and matmul precision",
        description=(
            "Print the JAX backend, the devices with their kinds and memory, the process "
            "count, the versions of jax/jaxlib/flax/optax/orbax, and the default matmul "
            "precision; warn loudly when a TPU or GPU was expected (--expect, or "
            "COLAB_TPU_ADDR / TPU_NAME / NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES in "
            "the environment) but JAX runs on the CPU. Exit status 1 in that case."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--expect",
        choices=EXPECT_CHOICES,
        default=None,
        help="the platform that must be found (default: from environment hints)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run_doctor(args: argparse.Namespace) -> int:
    """Runs ``jaxtrain doctor``: 0 when JAX runs where expected, 1 when it does not."""
    report = preflight(args.expect, verbose=not args.json)
    if args.json:
        from jaxtrain.writers import dumps_strict

        print(dumps_strict(report, indent=2))
    return 0 if report["ok"] else 1
