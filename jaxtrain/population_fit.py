"""What `fit` does with a population: member records, per-member early stopping, the best.

Lives here: reading a population step's ``[N]`` metrics back into train records (one
list of N values per metric), the per-member early stopping (`MemberEarlyStop`: a member
out of patience is frozen through ``active``, no recompilation), the end-of-run report
(`PopulationReport`: ``history.population``, with the best member) and `best_member`.
Must not live here: the step (`jaxtrain.population_step`), the state
(`jaxtrain.population`), writers. Never imports the loop, the CLI or torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxtrain.callbacks import Callback
from jaxtrain.evaluation import EarlyStop
from jaxtrain.loop_state import LoopState
from jaxtrain.losses import INVALID_COUNT_KEYS
from jaxtrain.population import PopulationState, member_hparams, set_active

__all__ = ["best_member", "member_step_metrics"]

_log = logging.getLogger("jaxtrain")

#: Per-member values a record keeps at their last step rather than averaging.
_LAST_VALUE = (
    "learning_rate",
    "skipped_steps",
    "loss_scale",
    "loss_scale_overflows",
    "active",
    "diverged",
)


def member_step_metrics(pending: Sequence[tuple[Mapping[str, Any], int]]) -> list[dict]:
    """Reads a population's metrics back (one transfer) as one dict per real step.

    Args:
        pending: ``(metrics, steps)`` per call: ``[N]`` values for one step, ``[K, N]``
            for K fused steps (the first ``steps`` real), or restored host lists ``[N]``.

    Returns:
        One dict ``{name: array [N]}`` per real training step, in order.

    Example:
        >>> import numpy as np
        >>> fused = ({"loss": np.array([[1.0, 2.0], [3.0, 4.0]])}, 1)  # K=2, one real step
        >>> [m["loss"].tolist() for m in member_step_metrics([({"loss": [5.0, 6.0]}, 1), fused])]
        [[5.0, 6.0], [1.0, 2.0]]
    """
    out: list[dict] = []
    host = jax.device_get([m for m, _ in pending])
    for m, (_, steps) in zip(host, pending, strict=True):
        arrays = {k: np.asarray(v) for k, v in m.items()}
        if any(a.ndim >= 2 for a in arrays.values()):  # fused: [K, N]
            n = min(next(a.shape[0] for a in arrays.values() if a.ndim >= 2), steps)
            out.extend({k: a[i] for k, a in arrays.items()} for i in range(n))
        else:
            out.append(arrays)
    return out


def member_records(
    pending: Sequence[tuple[Mapping[str, Any], int]], first_step: int, names: Sequence[str]
) -> dict[str, Any]:
    """A train record's metrics for a population: ``{name: [N values]}``.

    Each member's value is the mean over the interval's steps in which it trained (a
    frozen member's metrics are NaN: null in JSON when it trained in none of them);
    ``learning_rate``, ``skipped_steps``, ``active``, ``diverged`` are the last values.
    A member that diverged in the interval is reported once (a warning naming the step
    and the first non-finite value).
    """
    from jaxtrain.train_log import _check_invalid_counts  # train_log imports this module

    host = member_step_metrics(pending)
    _check_invalid_counts(
        [{k: np.sum(m[k]) for k in INVALID_COUNT_KEYS if k in m} for m in host], first_step
    )
    _warn_diverged(host, first_step, names)
    out: dict[str, Any] = {}
    for k in host[0]:
        if k == "nonfinite_leaf" or k in INVALID_COUNT_KEYS:
            continue
        values = np.stack([np.asarray(m[k]) for m in host])  # [steps, N]
        if k in _LAST_VALUE:
            out[k] = values[-1].tolist()
        elif np.issubdtype(values.dtype, np.floating):
            with np.errstate(all="ignore"):
                finite_count = np.sum(~np.isnan(values), axis=0)
                sums = np.nansum(values.astype(np.float64), axis=0)
                means = np.where(finite_count > 0, sums / np.maximum(finite_count, 1), np.nan)
            out[k] = [float(v) for v in means]
        else:
            out[k] = [float(v) for v in values.astype(np.float64).mean(axis=0)]
    return out


def _warn_diverged(host: Sequence[Mapping[str, Any]], first_step: int, names: Sequence) -> None:
    for s, m in enumerate(host):
        leaf = np.asarray(m.get("nonfinite_leaf", -1)).reshape(-1)
        diverged = np.asarray(m.get("diverged", False)).reshape(-1)
        for i in np.flatnonzero((leaf >= 0) & diverged):
            idx = int(leaf[i])
            where = names[idx] if idx < len(names) else f"value #{idx}"
            _log.warning(
                "jaxtrain population: member %d diverged at step %d (first non-finite value: "
                "%s); it is frozen at its last finite state, the others go on.",
                int(i),
                first_step + s + 1,
                where,
            )


def _nan(v: Any) -> float:
    """A record value as a float (None, from a JSON null, is NaN)."""
    return math.nan if v is None else float(v)


def best_member(
    records: Sequence[Mapping[str, Any]],
    metric: str,
    mode: str = "min",
    exclude: Sequence[int] = (),
) -> int | None:
    """The member with the best ``metric`` in the newest record that has it.

    Args:
        records: train or eval records of a population (``{metric: [N values]}``).
        metric: e.g. ``"loss"`` or ``"accuracy"``.
        mode: ``"min"`` or ``"max"``.
        exclude: members never chosen (e.g. the diverged ones).

    Returns:
        The member's index, or None when no record has the metric or every value is
        NaN/null or excluded.

    Example:
        >>> best_member([{"accuracy": [0.5, 0.9, None]}], "accuracy", "max")
        1
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max'; got {mode!r}.")
    for record in reversed(records):
        values = record.get(metric)
        if isinstance(values, list):
            scores = np.array([_nan(v) for v in values])
            scores[list(exclude)] = np.nan
            if np.all(np.isnan(scores)):
                return None
            return int(np.nanargmin(scores) if mode == "min" else np.nanargmax(scores))
    return None


class MemberEarlyStop(EarlyStop):
    """`EarlyStopping` per member: a member out of patience is frozen (``active``).

    ``best`` and ``bad_evals`` are lists of N (saved in checkpoints); the run stops
    when no member is active any more.
    """

    def __init__(self, rule: Any):
        super().__init__(rule)
        self.best: Any = None
        self.bad_evals: Any = 0
        self.stopped: list[bool] = []
        self.ended = False  # the final evaluation updates the counters, stops no one

    def on_eval_end(self, loop: LoopState, record: dict) -> None:
        if self.rule.metric not in record:
            super().on_eval_end(loop, record)  # its KeyError names the metrics
        values = [_nan(v) for v in record[self.rule.metric]]
        n = len(values)
        if self.best is None:
            self.best, self.bad_evals, self.stopped = [None] * n, [0] * n, [False] * n
        active = np.asarray(jax.device_get(loop.state.active))  # evaluation syncs anyway
        for i, value in enumerate(values):
            if not active[i] or self.stopped[i]:
                continue
            if not math.isnan(value) and self.rule.improved(value, self.best[i]):
                self.best[i], self.bad_evals[i] = value, 0
            else:
                self.bad_evals[i] += 1
            if self.bad_evals[i] >= self.rule.patience and not self.ended:
                self.stopped[i] = True
                _log.info("jaxtrain population: member %d stopped early at step %d", i, loop.step)
        mask = active & ~np.asarray(self.stopped)
        if not np.array_equal(mask, active):
            loop.state = set_active(loop.state, mask)
        if not mask.any():
            loop.stop = True

    def on_loop_end(self, loop: LoopState) -> None:
        self.ended = True
        loop.history.stopped_early = bool(self.stopped) and all(
            s or not a for s, a in zip(self.stopped, _host_active(loop.state), strict=True)
        )

    def dump(self) -> dict[str, Any]:
        """The counters a checkpoint saves."""
        return {"best": self.best, "bad_evals": self.bad_evals, "stopped": self.stopped}

    def load(self, saved: Mapping[str, Any]) -> None:
        """Restores `dump`'s counters."""
        self.best = saved.get("best")
        bad = saved.get("bad_evals", 0)
        self.bad_evals = list(bad) if isinstance(bad, list) else bad
        self.stopped = list(saved.get("stopped") or [])


def _host_active(state: PopulationState) -> list[bool]:
    return [bool(a) for a in np.asarray(jax.device_get(state.active))]


class PopulationReport(Callback):
    """Ends the run when no member is active; at the end, ``history.population``.

    The best member: by the early-stopping rule's metric and mode when given, else the
    eval ``loss`` (min) when the evaluations report one, else the train ``loss`` (min), in
    the newest record that has it; diverged members are never the best.
    """

    def __init__(self, early_stop: MemberEarlyStop | None):
        self.early_stop = early_stop

    def on_log(self, loop: LoopState, record: dict) -> None:
        active = record.get("active")
        if isinstance(active, list) and active and not any(active):
            _log.warning("jaxtrain population: no member is active any more: training stops.")
            loop.stop = True

    def on_train_end(self, loop: LoopState) -> None:
        loop.history.population = self.summary(loop)

    def summary(self, loop: LoopState) -> dict[str, Any]:
        """The report: every member's hyperparameters, state and final metrics, the best."""
        state: PopulationState = loop.state
        h = loop.history
        rule = None if self.early_stop is None else self.early_stop.rule
        if rule is not None:
            metric, mode, split = rule.metric, rule.mode, "eval"
        else:
            has_eval_loss = any("loss" in r for r in h.eval)
            metric, mode, split = "loss", "min", "eval" if has_eval_loss else "train"
        records = h.eval if split == "eval" else h.train
        host = jax.device_get({"a": state.active, "d": state.diverged, "s": state.members.step})
        diverged = [int(i) for i in np.flatnonzero(host["d"])]
        best = best_member(records, metric, mode, exclude=diverged)
        stopped = list(self.early_stop.stopped) if self.early_stop is not None else []
        hp = member_hparams(state)
        members = []
        for i in range(state.size):
            last_train = _member_values(h.train, i)
            last_eval = _member_values(h.eval, i)
            score = (last_eval if split == "eval" else last_train).get(metric)
            members.append(
                {
                    "member": i,
                    "seed": hp[i]["seed"],
                    "hparams": {k: v for k, v in hp[i].items() if k != "seed"},
                    "steps": int(host["s"][i]),
                    "active": bool(host["a"][i]),
                    "diverged": bool(host["d"][i]),
                    "stopped_early": bool(stopped[i]) if i < len(stopped) else False,
                    "score": score,
                    "train": last_train,
                    "eval": last_eval,
                }
            )
        return {
            "size": state.size,
            "metric": metric,
            "mode": mode,
            "split": split,
            "best": best,
            "members": members,
        }


def _member_values(records: Sequence[Mapping[str, Any]], i: int) -> dict[str, Any]:
    """Member ``i``'s values in the newest record (step and epoch kept)."""
    if not records:
        return {}
    record = records[-1]
    out: dict[str, Any] = {"step": record.get("step"), "epoch": record.get("epoch")}
    for k, v in record.items():
        if isinstance(v, list) and i < len(v):
            x = v[i]
            out[k] = None if isinstance(x, float) and math.isnan(x) else x
    return out


def rank_value(values: Any, mode: str) -> Any:
    """A checkpoint's rank from a population's eval values: the best member's value.

    Example:
        >>> rank_value([0.2, None, 0.7], "max"), rank_value(0.5, "max")
        (0.7, 0.5)
    """
    if not isinstance(values, list):
        return values
    scores = np.array([_nan(v) for v in values])
    if np.all(np.isnan(scores)):
        return math.nan
    return float(np.nanmax(scores) if mode == "max" else np.nanmin(scores))


def check_fit(state: Any, train_step: Any, eval_step: Any) -> bool:
    """`fit`'s check that the state, the train step and the eval step agree.

    Returns:
        True for a population run (a `PopulationState` and a population step).
    """
    is_pop = isinstance(state, PopulationState)
    spec = getattr(train_step, "spec", None)
    step_pop = bool(getattr(spec, "population", False))
    if is_pop and not step_pop:
        raise ValueError(
            "fit got a PopulationState but a train step that is not a population step. "
            "Fix: build it with jaxtrain.population_step.make_population_step(loss_fn, "
            "optimizer, ...)."
        )
    if step_pop and not is_pop:
        raise ValueError(
            f"fit got a population train step but a {type(state).__name__}, not a "
            "PopulationState. Fix: build the state with jaxtrain.population.create(...) or "
            "from_state(...), or use make_train_step for a single run."
        )
    eval_pop = bool(getattr(getattr(eval_step, "spec", None), "population", False))
    if eval_step is not None and is_pop != eval_pop:
        fix = (
            "jaxtrain.population_step.make_population_eval_step(eval_fn)"
            if is_pop
            else "make_eval_step(eval_fn)"
        )
        raise ValueError(
            f"fit's eval_step does not match the run: a {'population' if is_pop else 'single'} "
            f"run needs {fix}."
        )
    return is_pop
