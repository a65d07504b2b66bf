"""``jaxtrain compare``: the same training run in PyTorch and in jaxtrain, side by side.

Importing this module does not import PyTorch; running the command does, and says how to
install it when it is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from jaxtrain.apps import fields
from jaxtrain.writers import dumps_strict

COMMAND = "compare"
MODELS = ("mlp-tanh", "cnn-tanh", "mlp", "cnn")
PRESETS = ("sgd", "sgd-nesterov-wd", "adam", "adamw", "clip", "cosine-warmup")


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``compare`` subcommand to ``jaxtrain``'s subparsers.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``compare`` parser; its ``func`` default is `run_compare`.
    """
    p = subparsers.add_parser(
        COMMAND,
        help="train the same model in PyTorch and jaxtrain side by side (needs torch)",
        description=(
            "Train a model with PyTorch (zero_grad, forward, loss, backward, step, "
            "scheduler.step) and with jaxtrain's train_step, from identical weights on the "
            "same digits batches, then print step / torch loss / jax loss / relative "
            "difference and write OUT/compare.png (both curves and the difference) and "
            "OUT/compare.json. Needs PyTorch: pip install torch==2.13.0 then "
            "pip install -e .[torch]."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="mlp-tanh",
        help="mlp-tanh, cnn-tanh: smooth nn.Sequential models; mlp, cnn: jaxtrain.models.MLP and jaxtrain.models.CNN (ReLU, max-pool) and their torch twins",
    )
    p.add_argument(
        "--optimizer",
        choices=PRESETS,
        default="adam",
        help="optimizer preset (see jaxtrain.contrast.runner.presets)",
    )
    p.add_argument(
        "--lr", type=fields.positive_float, default=None, help="override the preset's lr"
    )
    p.add_argument("--steps", type=fields.positive_int, default=200, help="training steps")
    p.add_argument("--batch-size", type=fields.positive_int, default=32, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    p.add_argument(
        "--label-smoothing", type=float, default=0.0, help="CrossEntropyLoss label smoothing"
    )
    p.add_argument(
        "--every", type=fields.positive_int, default=10, help="print every N-th step in the table"
    )
    p.add_argument(
        "--x64",
        action="store_true",
        help="both sides in float64 (torch.float64, JAX's x64 mode for this run): exact "
        "parity, target 1e-12 per step and on the final parameters",
    )
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.set_defaults(func=run_compare)
    return p


def run_compare(args: argparse.Namespace) -> int:
    """Runs ``jaxtrain compare``; returns the exit status (2 on a usage error)."""
    torch = _import_torch()
    if torch is None:
        return 2
    import jax

    from jaxtrain.contrast.runner import compare, digits_models, presets
    from jaxtrain.data import load_digits

    if not 0 <= args.label_smoothing < 1:
        _error(f"--label-smoothing must be in [0, 1); got {args.label_smoothing}.")
        return 2
    if not 0 <= args.seed < 2**63:  # jax.random.key's and torch.manual_seed's common range
        _error(f"--seed must be an integer in [0, 2**63); got {args.seed}.")
        return 2
    try:  # before the run: an unusable --out must not cost the training
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        _error(f"--out {args.out!r} is not a usable directory: {e}. Fix: name a directory.")
        return 2
    spec = presets(args.steps)[args.optimizer]
    if args.lr is not None:
        spec = dataclasses.replace(spec, lr=args.lr)
    train, _ = load_digits()
    if args.batch_size > len(train["x"]):
        _error(
            f"--batch-size {args.batch_size} is larger than the digits training set "
            f"({len(train['x'])} examples): every batch would be dropped. Fix: a smaller "
            "--batch-size."
        )
        return 2
    torch_model, jax_model = digits_models(args.model, args.seed)
    label = f"{args.model}, {args.optimizer} (lr {spec.lr:g}), {args.steps} steps"
    result = compare(
        torch_model,
        spec,
        train,
        input_shape=(1, 8, 8),
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        label_smoothing=args.label_smoothing,
        jax_model=jax_model,
        label=label,
        dtype="float64" if args.x64 else "float32",
    )
    png, js = _write_results(result, args.out)
    print(f"{label}; torch {torch.__version__}, jax {jax.__version__}, {result.dtype}, CPU")
    print(result.table(args.every))
    print(_verdict(result.summary()))
    print(f"wrote {png} and {js}")
    return 0


def _error(message: str) -> None:
    """Prints a usage error as ``jaxtrain compare``'s one line on stderr."""
    print(f"jaxtrain compare: error: {message}", file=sys.stderr)


def _import_torch() -> Any:
    """The ``torch`` module, or None after printing how to install it."""
    from jaxtrain.contrast._torch import INSTALL_HINT

    try:
        import torch
    except ImportError:
        _error(f"PyTorch is not installed. Fix: {INSTALL_HINT}")
        return None
    return torch


def _write_results(result: Any, out: str) -> tuple[str, str]:
    """Writes ``OUT/compare.png`` and ``OUT/compare.json``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    png = result.plot(os.path.join(out, "compare.png"))
    js = os.path.join(out, "compare.json")
    with open(js, "w") as f:
        f.write(dumps_strict(result.to_dict()))  # strict JSON: a diverged loss is null
    return png, js


def _verdict(s: dict[str, Any]) -> str:
    """The summary line: the headline differences against the parity targets."""
    from jaxtrain.contrast.runner import targets

    t_first, t_all, t_params = targets(s["dtype"])
    verdict = "all met" if s["meets_targets"] else "NOT all met"
    return (
        f"max rel diff: first 10 steps {s['max_rel_diff_first_10']:.2e} (target "
        f"{t_first:g}), all steps {s['max_rel_diff_all']:.2e} (target {t_all:g}); "
        f"final params max abs diff {s['final_param_max_abs_diff']:.2e} (target "
        f"{t_params:g}): {verdict}"
    )
