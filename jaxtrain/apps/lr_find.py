"""``jaxtrain lr-find``: the learning-rate range test on the digits task, plotted.

Runs `jaxtrain.lr_find.lr_find` for a built-in model and optimizer of ``jaxtrain
train`` (the same `jaxtrain.apps.digits.make_optimizer`, model, loss, data split and
seeds), then writes ``OUT/lr_find.json`` (strict JSON: the configuration, the curve,
the suggestion and the rule) and ``OUT/lr_find.png`` (raw and smoothed loss against the
rate on a log axis, the suggestion and the lowest loss marked), and prints the
suggestion with the ``jaxtrain train`` command that uses it.

What must not live here: the sweep itself (`jaxtrain.lr_find`). Part of
`jaxtrain.apps`: the core never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from jaxtrain.apps import fields
from jaxtrain.apps.digits import TrainConfig
from jaxtrain.apps.fields import option
from jaxtrain.lr_find import RULES

COMMAND = "lr-find"
JSON_FILE = "lr_find.json"
PNG_FILE = "lr_find.png"


def _as_train(name: str) -> Any:
    """The `TrainConfig` field ``name``'s declaration (default, help, allowed values)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return dataclasses.field(default=field.default, metadata=field.metadata)


@dataclasses.dataclass(frozen=True)
class LRFindConfig:
    """What ``jaxtrain lr-find`` sweeps: the training setup and the sweep's range.

    Attributes:
        model, optimizer, weight_decay, label_smoothing, batch_size, seed, split_seed:
            as in `jaxtrain.apps.digits.TrainConfig` (declared there once).
        min_lr, max_lr: the sweep's first and last learning rate.
        steps: steps of the sweep.
        rule: the suggestion rule (`jaxtrain.lr_find.RULES`).
        out: the output folder.

    Example:
        >>> LRFindConfig(steps=2).validate()
        Traceback (most recent call last):
        ...
        ValueError: steps must be an integer >= 3; got 2.
    """

    model: str = _as_train("model")
    optimizer: str = _as_train("optimizer")
    weight_decay: float = _as_train("weight_decay")
    label_smoothing: float = _as_train("label_smoothing")
    batch_size: int = _as_train("batch_size")
    seed: int = _as_train("seed")
    split_seed: int = _as_train("split_seed")
    min_lr: float = option(1e-7, "first learning rate of the sweep", above=0)
    max_lr: float = option(
        10.0, "last learning rate of the sweep (if the loss has not diverged)", above=0
    )
    steps: int = option(200, "steps of the exponential sweep from min-lr to max-lr", minimum=3)
    rule: str = option(
        "min/10",
        "suggestion rule: min/10 = a tenth of the rate at the lowest smoothed loss; steepest "
        "= the rate where the smoothed loss falls fastest",
        choices=RULES,
    )
    out: str = option(
        "runs/lr-find",
        f"output folder for {JSON_FILE} and {PNG_FILE} (existing ones are refused, see "
        "--overwrite)",
    )

    def validate(self) -> None:
        """Raises ValueError naming the field, what it allows and the value it holds."""
        fields.validate(self)
        if not self.min_lr < self.max_lr:
            raise ValueError(
                f"min_lr must be below max_lr; got --min-lr {self.min_lr:g} --max-lr "
                f"{self.max_lr:g}. Fix: e.g. --min-lr 1e-7 --max-lr 10."
            )


def plot_lr_find(result: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> str:
    """Draws the loss (raw, faint; smoothed, bold) against the rate, log x axis.

    Args:
        result: `jaxtrain.lr_find.LRFindResult.to_dict` (or the JSON record).
        path: where to write the PNG.
        title: the figure title.

    Returns:
        The path written.

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> result = {"learning_rates": [1e-4, 1e-3, 1e-2], "losses": [2.0, 1.0, 3.0],
        ...           "smoothed": [2.0, 1.5, 2.0], "suggestion": 1e-4, "min_loss_lr": 1e-3,
        ...           "rule": "min/10"}
        >>> path = plot_lr_find(result, os.path.join(tmp.name, "lr.png"))
        >>> os.path.getsize(path) > 0
        True
        >>> tmp.cleanup()
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lrs, raw, smooth = result["learning_rates"], result["losses"], result["smoothed"]
    finite = [v for v in smooth if v is not None and math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, raw, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(lrs, smooth, color="tab:blue", lw=2, label="smoothed loss")
    if result.get("min_loss_lr"):
        ax.axvline(result["min_loss_lr"], color="gray", ls=":", label="lowest smoothed loss")
    if result.get("suggestion"):
        ax.axvline(
            result["suggestion"],
            color="tab:red",
            ls="--",
            label=f"suggestion {result['suggestion']:.2g} ({result.get('rule', '')})",
        )
    if finite:  # the diverging tail would squash the interesting part
        low, high = min(finite), finite[0]
        ax.set_ylim(low - 0.1 * (high - low + 1e-12), max(high, low) + 0.5 * (high - low + 1e-12))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


def add_lr_find_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``jaxtrain lr-find`` (its options generated from `LRFindConfig`).

    Args:
        subparsers: the ``jaxtrain`` parser's subparsers.

    Returns:
        The new subparser.
    """
    p = subparsers.add_parser(
        COMMAND,
        help="learning-rate range test on the digits data: suggests --lr for jaxtrain train",
        description=(
            "Train a copy of the model for a few hundred steps while the learning rate grows "
            f"exponentially; write OUT/{JSON_FILE} and OUT/{PNG_FILE} and print the suggested "
            "rate."
        ),
        formatter_class=fields.HelpFormatter,
        allow_abbrev=False,
    )
    fields.add_arguments(p, LRFindConfig)
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace an existing {JSON_FILE} / {PNG_FILE}"
    )
    return p


def run(cfg: LRFindConfig, overwrite: bool = False) -> dict[str, Any]:
    """Runs the sweep of ``cfg``, writes its files and returns the JSON record.

    Args:
        cfg: the configuration.
        overwrite: replace existing output files.

    Returns:
        The record written to ``OUT/lr_find.json``.
    """
    from jaxtrain import data as data_lib
    from jaxtrain.apps.digits import _model, make_optimizer
    from jaxtrain.apps.tasks import classification_loss, init_model
    from jaxtrain.lr_find import lr_find
    from jaxtrain.state import TrainState
    from jaxtrain.writers import dumps_strict

    cfg.validate()
    json_path, png_path = os.path.join(cfg.out, JSON_FILE), os.path.join(cfg.out, PNG_FILE)
    existing = [p for p in (json_path, png_path) if os.path.lexists(p)]
    if existing and not overwrite:
        raise ValueError(
            f"out: {', '.join(existing)} already exist(s); refusing to replace an earlier "
            "sweep. Fix: choose another --out, or pass --overwrite."
        )
    os.makedirs(cfg.out, exist_ok=True)
    train, _ = data_lib.load_digits(seed=cfg.split_seed)
    train_ds = data_lib.ArrayDataset(train, cfg.batch_size, seed=cfg.seed, num_classes=10)
    model = _model(TrainConfig(model=cfg.model))
    params, model_state = init_model(model, cfg.seed, train["x"][:1])
    state = TrainState.create(
        params, make_optimizer(cfg.optimizer, 1.0, cfg.weight_decay), cfg.seed, model_state
    )
    result = lr_find(
        classification_loss(model, cfg.label_smoothing),
        lambda lr: make_optimizer(cfg.optimizer, lr, cfg.weight_decay),
        state,
        train_ds,
        min_lr=cfg.min_lr,
        max_lr=cfg.max_lr,
        num_steps=cfg.steps,
        rule=cfg.rule,
    )
    record = {"task": "digits", "config": dataclasses.asdict(cfg), **result.to_dict()}
    with open(json_path, "w", encoding="utf-8") as f:
        f.write(dumps_strict(record, indent=2))
    plot_lr_find(record, png_path, title=f"{model.name} + {cfg.optimizer} on digits")
    return record


def run_lr_find(args: argparse.Namespace) -> int:
    """``jaxtrain lr-find``: 0 done (a suggestion printed); 1 no suggestion; 2 a user error;
    130 interrupted (Ctrl-C)."""
    cfg = LRFindConfig(**fields.from_args(args, LRFindConfig))
    try:
        record = run(cfg, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"jaxtrain {COMMAND}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, as jaxtrain train (files come at the end)
        print(
            f"jaxtrain {COMMAND}: interrupted (its {JSON_FILE} and {PNG_FILE} are written only "
            "once the sweep has ended)",
            file=sys.stderr,
        )
        return 130
    print(f"wrote {cfg.out}/{JSON_FILE}, {cfg.out}/{PNG_FILE} ({len(record['losses'])} steps; "
          f"{record['reason']})")  # fmt: skip
    if record["suggestion"] is None:
        print(
            f"jaxtrain {COMMAND}: error: too few finite losses for a suggestion. Fix: lower "
            f"--min-lr (now {cfg.min_lr:g}) or raise --steps.",
            file=sys.stderr,
        )
        return 1
    print(
        f"suggested learning rate: {record['suggestion']:.3g} (rule {cfg.rule}: "
        + (
            f"a tenth of {record['min_loss_lr']:.3g}, the rate at the lowest smoothed loss)"
            if cfg.rule == "min/10"
            else "the steepest descent of the smoothed loss)"
        )
    )
    print(f"use it: jaxtrain train --model {cfg.model} --optimizer {cfg.optimizer} "
          f"--lr {record['suggestion']:.3g}")  # fmt: skip
    return 0
