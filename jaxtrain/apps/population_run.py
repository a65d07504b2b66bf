"""``jaxtrain train --population N``: the digits job as N runs trained in one compiled step.

Lives here: what a population changes in the digits job (`jaxtrain.apps.digits`): the
members a configuration describes (`members`: the grid of the list-valued ``--lr``,
``--weight-decay``, ``--seed``), the checks of the population options (`check`), the
population's optimizer, state and steps (`build_parts`), its ``summary.json`` record
(`summary`) and the command's report (`report_lines`). The training loop, the run folder,
checkpoints and resume are the single run's (`jaxtrain.apps.digits`, `jaxtrain.fit`): a
population run folder is resumed, refused or overwritten exactly like a single run's, and
its identity (``config.json``) includes the population fields.

Must not live here: the population core (`jaxtrain.population`,
`jaxtrain.population_step`, `jaxtrain.population_fit`). Part of `jaxtrain.apps`: the core
never imports it.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import jax
import optax

from jaxtrain import population as pop_lib
from jaxtrain.population_step import make_population_eval_step, make_population_step

#: The configuration fields that take a list of values, in grid order (first slowest).
SWEEP_FIELDS = ("lr", "weight_decay", "seed")
#: ``--nonfinite`` for a population: the core policy each choice maps to. "raise" (the
#: default) freezes a diverged member as "freeze" does, and the command then exits 1
#: naming it; "freeze" only reports it.
NONFINITE_POLICY = {"raise": "freeze", "freeze": "freeze", "skip": "skip", "off": None}
_SEED_TOP = 2**32 - 1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _lists(cfg: Any) -> dict[str, list]:
    """The list-valued sweep fields of ``cfg``, in grid order."""
    return {f: getattr(cfg, f) for f in SWEEP_FIELDS if isinstance(getattr(cfg, f), list)}


def members(cfg: Any) -> list[dict[str, Any]]:
    """The members of a population configuration: ``[{"seed", "lr", "weight_decay"}]``.

    Every combination of the list-valued fields (``lr``, then ``weight_decay``, then
    ``seed``; the first slowest); a field given as one value is shared. Without any list,
    the N members differ by seed only: ``seed, seed + 1, ..., seed + N - 1``.

    Args:
        cfg: a `jaxtrain.apps.digits.TrainConfig` with ``population`` set (checked by
            `check`).

    Returns:
        One dict per member, in member order.

    Example:
        >>> from jaxtrain.apps.digits import TrainConfig
        >>> members(TrainConfig(population=4, lr=[1e-3, 1e-2], seed=[0, 1]))[:2]
        [{'lr': 0.001, 'weight_decay': 0.0001, 'seed': 0}, {'lr': 0.001, 'weight_decay': 0.0001, 'seed': 1}]
        >>> [m["seed"] for m in members(TrainConfig(population=3, seed=5))]
        [5, 6, 7]
    """
    lists = _lists(cfg)
    if not lists:
        return [
            {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seed + i}
            for i in range(cfg.population)
        ]
    axes = {f: lists.get(f, [getattr(cfg, f)]) for f in SWEEP_FIELDS}
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def check(cfg: Any) -> None:
    """Refuses population options that do not fit together (one line each, with the fix).

    Called by ``TrainConfig.validate`` after every field's own check.

    Raises:
        ValueError: a list without ``--population``, a grid whose size is not N, or an
            option a population run does not support.
    """
    lists = _lists(cfg)
    if cfg.population is None:
        if lists:
            name, values = next(iter(lists.items()))
            n = math.prod(len(v) for v in lists.values())
            raise ValueError(
                f"{name}: a list of values ({_flag(name)} {','.join(map(str, values))}) trains "
                f"a population. Fix: add --population {n} (one member per combination), or "
                "give one value."
            )
        if cfg.nonfinite == "freeze":
            raise ValueError(
                "nonfinite: 'freeze' freezes one member of a population; this run has one "
                "model. Fix: --nonfinite raise, skip or off (or add --population N)."
            )
        if cfg.vectorize != "auto":
            raise ValueError(
                f"vectorize: --vectorize {cfg.vectorize} combines the members of a population; "
                "this run has one model. Fix: drop --vectorize (or add --population N)."
            )
        return
    _check_population(cfg, lists)


def _check_population(cfg: Any, lists: dict[str, list]) -> None:
    n = cfg.population
    if lists:
        size = math.prod(len(v) for v in lists.values())
        if size != n:
            grid = " x ".join(f"{_flag(f)} ({len(v)} values)" for f, v in lists.items())
            raise ValueError(
                f"population: --population {n}, but {grid} make {size} member(s) (every "
                f"combination). Fix: --population {size}, or change the lists."
            )
    elif cfg.seed + n - 1 > _SEED_TOP:
        raise ValueError(
            f"population: --population {n} gives the members seeds {cfg.seed} .. "
            f"{cfg.seed + n - 1}, above the largest seed {_SEED_TOP}. Fix: a smaller --seed."
        )
    refused = [
        (cfg.fsdp > 1, f"--fsdp {cfg.fsdp}", "members are replicated, the batch is sharded"),
        (cfg.ema is not None, f"--ema {cfg.ema}", "no parameter average per member yet"),
        (cfg.mlflow, "--mlflow", "its metrics are one number per step, not one per member"),
        (cfg.wandb, "--wandb", "its metrics are one number per step, not one per member"),
    ]
    for bad, what, why in refused:
        if bad:
            raise ValueError(
                f"population: {what} is not supported with --population ({why}). "
                f"Fix: drop {what.split()[0]}, or train single runs."
            )


def _optimizer(cfg: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """The digits optimizer (`digits.make_optimizer`'s) with per-member hyperparameters.

    ``optax.inject_hyperparams`` keeps ``peak_lr`` and ``weight_decay`` in the optimizer
    state (``[N]`` values in a population). The learning rate itself is an inner
    ``inject_hyperparams(scale_by_learning_rate)`` whose schedule is ``peak_lr *
    shape(step)`` (shape: the warmup-cosine schedule of peak 1, or 1): its state holds
    each member's current rate, which the step reports as ``learning_rate``. Member i's
    update is the single run's with ``--lr lr_i`` up to float32 rounding (optax computes
    that schedule as ``lr_i * shape`` in another order).
    """
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    shape: Any = None
    if cfg.schedule == "cosine":
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total - 1, 0))
        shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total, warmup + 1))
    name = cfg.optimizer

    def factory(peak_lr: Any, weight_decay: Any) -> optax.GradientTransformation:
        def schedule(count: Any) -> Any:
            return peak_lr if shape is None else peak_lr * shape(count)

        rate = optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=schedule)
        # The transforms of optax.adamw / adam / sgd (digits.make_optimizer), in its order.
        if name == "adamw":
            return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay), rate)
        if name == "adam":
            return optax.chain(optax.scale_by_adam(), rate)
        momentum = [optax.trace(decay=0.9)] if name == "momentum" else []
        return optax.chain(optax.add_decayed_weights(weight_decay), *momentum, rate)

    first = members(cfg)[0]
    return optax.inject_hyperparams(factory)(
        peak_lr=first["lr"], weight_decay=first["weight_decay"]
    )


def build_parts(cfg: Any, mesh: Any) -> Any:
    """The data, model, population state and population steps of ``cfg`` (`digits._Parts`).

    Member i is initialised exactly as the single run ``--seed s_i`` (same parameters,
    same dropout rng) and trained with its own ``lr`` and ``weight_decay``. The members
    share each batch; the data order is that of the first member's seed.
    """
    from jaxtrain import data as data_lib
    from jaxtrain.apps import digits
    from jaxtrain.apps.tasks import classification_eval, classification_loss, init_model
    from jaxtrain.parallel import init_sharded
    from jaxtrain.state import TrainState

    team = members(cfg)
    train, test = data_lib.load_digits(seed=cfg.split_seed)
    train_ds = data_lib.ArrayDataset(train, cfg.batch_size, seed=team[0]["seed"], num_classes=10)
    test_ds = data_lib.ArrayDataset(test, cfg.eval_batch_size, shuffle=False)
    model = digits._model(cfg)
    optimizer = _optimizer(cfg, train_ds.steps_per_epoch)
    precision = None if cfg.precision == "float32" else cfg.precision
    sample = train["x"][:1]

    def create() -> pop_lib.PopulationState:
        states = []
        for m in team:
            params, model_state = init_model(model, m["seed"], sample)
            state = TrainState.create(
                params, optimizer, m["seed"], model_state, precision=precision
            )
            hp = {"peak_lr": m["lr"], "weight_decay": m["weight_decay"]}
            states.append(pop_lib.set_hyperparams(state, **hp))
        return pop_lib.from_states(states, seeds=[m["seed"] for m in team])

    state = init_sharded(create, mesh)
    loss_fn = classification_loss(model, cfg.label_smoothing)
    step_kwargs: dict[str, Any] = dict(
        mesh=mesh,
        nonfinite=NONFINITE_POLICY[cfg.nonfinite],
        grad_accum_steps=cfg.grad_accum_steps,
        precision=precision,
        vectorize=cfg.vectorize,
    )
    if cfg.steps_per_call > 1:
        train_step = make_population_step(
            loss_fn,
            optimizer,
            steps_per_call=cfg.steps_per_call,
            unroll=True if cfg.unroll else 1,
            **step_kwargs,
        )
    else:
        train_step = make_population_step(loss_fn, optimizer, **step_kwargs)
    _report_vectorize(cfg, train_step, state, train_ds)
    eval_step = make_population_eval_step(classification_eval(model), mesh=mesh)
    return digits._Parts(
        train_ds, test_ds, model, optimizer, state, loss_fn, step_kwargs, train_step, eval_step
    )


def _report_vectorize(cfg: Any, train_step: Any, state: Any, train_ds: Any) -> None:
    """Says how the members are combined: ``--vectorize auto`` decided now (no compile).

    A convolutional model on CPU is looped (vmap's grouped convolutions measured 0.13-0.27x
    the speed of N separate runs there); a forced ``--vectorize vmap``/``map`` on that
    combination is warned about (BENCHMARKS.md, Population training).
    """
    import sys

    import numpy as np

    if cfg.vectorize == "auto":
        batch = next(iter(train_ds.batches(0)))
        k = cfg.steps_per_call
        if k > 1:  # fused steps take [K, B, ...]: shapes only, the trace is abstract
            batch = {n: jax.ShapeDtypeStruct((k, *np.shape(v)), v.dtype) for n, v in batch.items()}
        train_step.complete_args((state, batch))
        why = (
            "one compiled member step per member: a convolutional model on CPU"
            if train_step.spec.vectorize == "loop"
            else "the members batched in one call"
        )
        print(
            f"population: --vectorize auto chose {train_step.spec.vectorize} ({why})",
            file=sys.stderr,
        )
    elif cfg.model == "cnn" and jax.default_backend() == "cpu":
        warnings.warn(
            f"population: --vectorize {cfg.vectorize} on a CPU makes the CNN's population "
            "slower than N separate runs (vmap: grouped convolutions, measured 0.13-0.27x "
            "per member-step; map: 0.03x); --vectorize loop (what auto picks here) trains "
            "each member as its own run (see BENCHMARKS.md, Population training).",
            RuntimeWarning,
            stacklevel=3,
        )


def population_flops(step: Any, state: Any, flops: float) -> float:
    """FLOPs of one population step from ``step_flops(step, ...)``'s count.

    A ``vectorize="loop"`` step lowers (and counts) one member's call; the population
    step makes N of them. A vmapped or mapped step's count already covers the N members.
    """
    return flops * state.size if step.spec.vectorize == "loop" else flops


def one_step(parts: Any) -> Any:
    """A single (unfused) population step of ``parts``, for counting FLOPs."""
    return make_population_step(parts.loss_fn, parts.optimizer, **parts.step_kwargs)


def member_params(state: pop_lib.PopulationState) -> Any:
    """Member 0's parameters (the model summary counts one member's parameters)."""
    return jax.tree.map(lambda x: x[0], state.params)


def _value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def summary(cfg: Any, state: Any, history: Any) -> dict[str, Any]:
    """The population part of ``summary.json``: every member's final metrics, the best.

    The best member has the highest final test accuracy among the members that did not
    diverge (the metric of the best checkpoint and of ``--patience``).

    Returns:
        ``{"population", "members", "best_member", "best", "test_accuracy", ...}``: each
        member's seed, ``lr``, ``weight_decay``, final ``train`` and ``test`` metrics,
        ``steps`` (its own updates), ``skipped_steps``, ``active``, ``diverged``,
        ``stopped_early`` and ``params_sha256``.
    """
    from jaxtrain.checkpoint import state_digest
    from jaxtrain.population_fit import best_member

    team = members(cfg)
    report = history.population or {"members": [{} for _ in team]}
    host = jax.device_get(
        {"p": state.params, "skipped": state.skipped_steps, "steps": state.members.step}
    )
    diverged = [i for i, m in enumerate(report["members"]) if m.get("diverged")]
    best = best_member(history.eval, "accuracy", "max", exclude=diverged)
    rows = []
    for i, (m, r) in enumerate(zip(team, report["members"], strict=True)):
        test = {k: _value(v) for k, v in r.get("eval", {}).items()}
        rows.append(
            {
                "member": i,
                **m,
                "train": {k: _value(v) for k, v in r.get("train", {}).items()},
                "test": test,
                "test_accuracy": test.get("accuracy"),
                "steps": int(host["steps"][i]),
                "skipped_steps": int(host["skipped"][i]),
                "active": r.get("active"),
                "diverged": bool(r.get("diverged", False)),
                "stopped_early": bool(r.get("stopped_early", False)),
                "params_sha256": state_digest(jax.tree.map(lambda x, i=i: x[i], host["p"])),
            }
        )
    accuracy = rows[best]["test_accuracy"] if best is not None else None
    return {
        "population": len(team),
        "members": rows,
        "best_member": best,
        "best": rows[best] if best is not None else None,
        "diverged_members": diverged,
        "test_accuracy": accuracy,
        "skipped_steps": sum(r["skipped_steps"] for r in rows),
    }


def report_lines(cfg: Any, summary: dict[str, Any], target: float) -> tuple[list[str], list[str]]:
    """The command's report of a population run: (stdout lines, stderr error lines).

    An error line (exit 1) when no member ended finite, when a member diverged under
    ``--nonfinite raise`` (the default: the member was frozen, the others trained on), or
    when steps were skipped under ``--nonfinite skip``.
    """
    out, err = [], []
    rows = summary["members"]
    for r in rows:
        acc = r["test_accuracy"]
        acc_text = "diverged" if r["diverged"] else ("-" if acc is None else f"{acc * 100:.2f}%")
        out.append(
            f"member {r['member']}: seed {r['seed']}, lr {r['lr']:g}, weight decay "
            f"{r['weight_decay']:g}: test accuracy {acc_text}"
        )
    best = summary["best_member"]
    if best is None:
        err.append(
            "jaxtrain train: error: no member of the population ended with a finite test "
            f"accuracy. Fix: lower --lr (now {cfg.lr})."
        )
        return out, err
    acc = summary["test_accuracy"]
    verdict = "reached" if acc >= target else "NOT reached"
    out.append(
        f"best: member {best} (seed {rows[best]['seed']}, lr {rows[best]['lr']:g}, weight decay "
        f"{rows[best]['weight_decay']:g}): test accuracy {acc * 100:.2f}% (target >= "
        f"{target * 100:.1f}%: {verdict})"
    )
    diverged = summary["diverged_members"]
    if diverged and cfg.nonfinite == "raise":
        err.append(
            f"jaxtrain train: error: member(s) {diverged} of the population diverged (frozen at "
            "their last finite state; the others trained on, see summary.json). Fix: lower "
            "their --lr, or --nonfinite freeze to accept diverged members."
        )
    if summary["skipped_steps"]:
        err.append(
            f"jaxtrain train: error: {summary['skipped_steps']} member step(s) were skipped "
            "because their loss or gradients were not finite (--nonfinite skip); see "
            "summary.json's skipped_steps per member. Fix: lower their --lr."
        )
    return out, err
