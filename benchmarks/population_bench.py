"""Population section of benchmarks/run.py (issue #14): N members in one step vs N runs.

For the tiny MLP and the CNN and N = 1, 4, 16, 64 members, three ways to train N runs
with Adam on the same batches, timed side by side in one process (interleaved repeats,
medians):

* ``sequential``: N ordinary runs, one after another: the single-run
  ``jaxtrain.make_train_step`` (compiled once, shared by the N states) called N times per
  batch from Python: what N separate jobs cost on this machine;
* ``vmap``: ``make_population_step(vectorize="vmap")``: one call trains the N members
  (batched matmuls / convolutions);
* ``map``: ``make_population_step(vectorize="map")``: one call, the members one after
  another inside it (``lax.map``);
* ``loop``: ``make_population_step(vectorize="loop")``: one compiled member step called
  N times from Python (member index traced: one compile), writing each member back in
  place into the donated population: the CPU fallback for convolutional models, which
  ``vectorize="auto"`` (the default) picks there. Each row records that choice (``auto``).

The figure reported is the time per member-step (one member, one batch): a ratio
``sequential / vmap`` > 1 means the population trains faster than separate runs.
Importable (benchmarks/run.py, tests/test_benchmarks.py); no module-level JAX work.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

POP_MODELS = ("mlp64", "cnn")
WAYS = {
    "sequential": "N sequential runs (`make_train_step`, a Python loop over the N states)",
    "vmap": "population step, `vectorize='vmap'` (one call, batched members)",
    "map": "population step, `vectorize='map'` (one call, `lax.map` over members)",
    "loop": "population step, `vectorize='loop'` (N calls of one compiled member step)",
}
POP_WAYS = ("vmap", "map", "loop")
POP_SIZES = {
    # members, population steps per timed section (per model), repeats, warm-up sections
    "full": {"members": (1, 4, 16, 64), "steps": {"mlp64": 44, "cnn": 2}, "repeats": 5},
    "tiny": {"members": (1, 2), "steps": {"mlp64": 2, "cnn": 1}, "repeats": 1},
}
#: A way this many times slower than sequential at some N is not measured at larger N
#: (lax.map over the CNN's convolutions runs on XLA:CPU's slow in-loop path: minutes).
SKIP_SLOWER = 10.0
#: Goals of issue #14 on a 2-core CPU.
GOAL_SPEEDUP_N16_MLP = 1.4
GOAL_NOT_SLOWER = 1.05


def _contenders(bench: Any, module: Any, params0: Any, batches: list, n: int) -> dict[str, Any]:
    """``{way: prepare}``; ``prepare()`` returns ``run()`` (one timed section, blocking)."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxtrain as jt
    from jaxtrain import population as pop
    from jaxtrain.population_step import make_population_step

    loss_fn = bench.jaxtrain_loss(module)
    # Adam with its learning rate injected (the population's per-member value), in every
    # way alike, so the three run the same update.
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=bench.LEARNING_RATE)
    dev_batches = [jax.device_put(b) for b in batches]

    def fresh_state():
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), params0)
        return jt.TrainState.create(params, opt, 0)

    def sequential() -> Callable[[], Any]:
        step = jt.make_train_step(loss_fn, opt)
        states = [fresh_state() for _ in range(n)]

        def run():
            nonlocal states
            for b in dev_batches:
                for i in range(n):
                    states[i], m = step(states[i], b)
            return jax.block_until_ready(m["loss"])

        run.compiled = step  # type: ignore[attr-defined]
        return run

    def population(vectorize: str) -> Callable[[], Callable[[], Any]]:
        def prepare():
            step = make_population_step(loss_fn, opt, vectorize=vectorize, nonfinite=None)
            state = pop.from_state(fresh_state(), list(range(n)))

            def run():
                nonlocal state
                for b in dev_batches:
                    state, m = step(state, b)
                return jax.block_until_ready(m["loss"])

            run.compiled = step  # type: ignore[attr-defined]
            return run

        return prepare

    return {"sequential": sequential, **{w: population(w) for w in POP_WAYS}}


def _auto_choice(bench: Any, module: Any, params0: Any, batch: Any) -> str:
    """The way ``vectorize="auto"`` (the default) picks for this model here (no compile)."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxtrain as jt
    from jaxtrain import population as pop
    from jaxtrain.population_step import make_population_step

    opt = optax.inject_hyperparams(optax.adam)(learning_rate=bench.LEARNING_RATE)
    step = make_population_step(bench.jaxtrain_loss(module), opt, nonfinite=None)
    params = jax.tree.map(jnp.asarray, params0)
    state = pop.from_state(jt.TrainState.create(params, opt, 0), [0, 1])
    step.complete_args((state, batch))  # decides "auto" from an abstract trace
    return str(step.spec.vectorize)


def _time(
    preps: dict[str, Any], steps: int, n: int, repeats: int, skip: dict[str, str]
) -> dict[str, Any]:
    """Warms every way up (compiles), then times them interleaved (rotating order).

    A way in ``skip`` is not run: its entry says why (``status``), ``median_s`` None.
    """
    runs: dict[str, Any] = {}
    out: dict[str, Any] = {w: {"status": why, "median_s": None} for w, why in skip.items()}
    for way, prepare in preps.items():
        if way in skip:
            continue
        t0 = time.perf_counter()
        runs[way] = prepare()
        runs[way]()  # the warm-up section: compiles
        out[way] = {"warmup_s": time.perf_counter() - t0, "per_member_step_s": []}
    keys = list(runs)
    for r in range(repeats):
        for way in keys[r % len(keys) :] + keys[: r % len(keys)]:
            gc.collect()
            t0 = time.perf_counter()
            runs[way]()
            out[way]["per_member_step_s"].append((time.perf_counter() - t0) / (steps * n))
    for way in runs:
        entry = out[way]
        entry["status"] = "ok"
        entry["median_s"] = statistics.median(entry["per_member_step_s"])
        entry["compilations"] = runs[way].compiled.trace_count
    return {w: out[w] for w in preps}


def population_section(
    bench: Any,
    size: str = "full",
    models: tuple[str, ...] = POP_MODELS,
    repeats: int | None = None,
    members: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Measures the population ways for every model and N; returns the report section.

    Args:
        bench: the benchmarks/run.py module (its models, loss, batch size and formats).
        size: ``"full"`` (the measured table) or ``"tiny"`` (a smoke run).
        models: the models, a subset of `POP_MODELS`.
        repeats: timed sections per way (default: per ``size``).
        members: the population sizes N (default: per ``size``).

    Returns:
        ``{"config": ..., "models": {model: {str(N): {way: {median_s, ...},
        "speedup_vmap", "speedup_map", "best", "verdict"}}}, "goals": [...],
        "markdown": table}``.
    """
    import jax
    import jax.numpy as jnp

    import jaxtrain as jt
    from jaxtrain.data import load_digits

    spec = POP_SIZES[size]
    repeats = spec["repeats"] if repeats is None else repeats
    members = tuple(spec["members"] if members is None else members)
    train, _ = load_digits()
    dataset = jt.ArrayDataset(train, bench.BATCH_SIZE, seed=0, drop_remainder=True)
    report: dict[str, Any] = {
        "config": {"size": size, "members": list(members), "repeats": repeats, "steps": {}},
        "models": {},
    }
    for name in models:
        module = bench.linen_module(name)
        params0, _ = jax.jit(jt.from_linen(module).init)(
            jax.random.key(0), jnp.asarray(train["x"][:1])
        )
        steps = spec["steps"][name]
        report["config"]["steps"][name] = steps
        batches = list(dataset.batches(0))[:steps]
        auto = _auto_choice(bench, module, params0, batches[0])
        entry: dict[str, Any] = {"description": bench.model_description(name)}
        skip: dict[str, str] = {}
        for n in members:
            t0 = time.perf_counter()
            preps = _contenders(bench, module, params0, batches, n)
            ways = _time(preps, steps, n, repeats, skip)
            seq = ways["sequential"]["median_s"]
            row: dict[str, Any] = {"ways": ways, "auto": auto}
            for way in POP_WAYS:
                t = ways[way]["median_s"]
                row[f"speedup_{way}"] = None if t is None else seq / t
                if t is not None and t > SKIP_SLOWER * seq:
                    skip[way] = f"not measured: {t / seq:.0f}x slower than sequential at N={n}"
            measured = [w for w in POP_WAYS if row[f"speedup_{w}"] is not None]
            row["best"] = max(measured, key=lambda w: row[f"speedup_{w}"], default=None)
            row["seconds"] = time.perf_counter() - t0
            entry[str(n)] = row
            speeds = ", ".join(f"{w} x{row[f'speedup_{w}']:.2f}" for w in measured)
            print(
                f"[population {name} N={n}] sequential {seq * 1e3:.3f} ms, {speeds} per "
                f"member-step (speed-up over sequential); auto: {auto}",
                flush=True,
            )
            gc.collect()
        report["models"][name] = entry
    report["goals"] = population_goals(report)
    report["markdown"] = population_markdown(report, bench.fmt_time)
    return report


def population_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #14's CPU goals as rows ``{goal, model, members, ratio, target, result}``.

    * tiny MLP, N = 16: ``sequential / vmap`` >= 1.4;
    * every model and N > 1: the population is never slower than sequential by more
      than 5%, i.e. ``sequential / way`` >= 1 / 1.05, for the way the library's default
      ``vectorize="auto"`` picks (``row["auto"]``: ``loop`` for a convolutional model on
      CPU, else ``vmap``), or the fastest way measured where a row does not say.
    """
    rows = []
    mlp = report["models"].get("mlp64", {}).get("16")
    if mlp is not None:
        ratio = mlp["speedup_vmap"]
        rows.append(
            {
                "goal": f"population (vmap) >= {GOAL_SPEEDUP_N16_MLP}x sequential, N = 16",
                "model": "mlp64",
                "members": 16,
                "ratio": ratio,
                "op": ">=",
                "target": GOAL_SPEEDUP_N16_MLP,
                "result": "MET" if ratio >= GOAL_SPEEDUP_N16_MLP else "MISSED",
            }
        )
    for name, entry in report["models"].items():
        for key, row in entry.items():
            if key == "description" or int(key) == 1:
                continue
            way = row.get("auto") or row["best"]
            if way is None or row[f"speedup_{way}"] is None:  # skipped (far too slow)
                rows.append(
                    {
                        "goal": "population not slower than sequential by > 5%",
                        "model": name,
                        "members": int(key),
                        "ratio": None,
                        "op": ">=",
                        "target": round(1 / GOAL_NOT_SLOWER, 4),
                        "result": "MISSED (not measured: slower at a smaller N)",
                    }
                )
                continue
            ratio = row[f"speedup_{way}"]
            rows.append(
                {
                    "goal": f"population ({way}) not slower than sequential by > 5%",
                    "model": name,
                    "members": int(key),
                    "ratio": ratio,
                    "op": ">=",
                    "target": round(1 / GOAL_NOT_SLOWER, 4),
                    "result": "MET" if ratio >= 1 / GOAL_NOT_SLOWER else "MISSED",
                }
            )
    return rows


def population_markdown(report: dict[str, Any], fmt_time: Callable[[float], str]) -> str:
    """The section's table: per member-step time of each way, and the speed-ups."""
    cfg = report["config"]
    lines = [
        "Population training: time per member-step (one member, one batch of 128), median "
        f"over {cfg['repeats']} interleaved repeats; speed-up = sequential / population.",
        "",
        "| model | N | sequential | vmap | map | loop | vmap speed-up | map speed-up | "
        "loop speed-up | faster | auto picks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["models"].values():
        for key, row in entry.items():
            if key == "description":
                continue
            w = row["ways"]

            def cell(way: str, w: dict = w) -> str:
                t = w[way]["median_s"]
                return w[way]["status"] if t is None else fmt_time(t)

            def ratio(way: str, row: dict = row) -> str:
                r = row[f"speedup_{way}"]
                return "—" if r is None else f"{r:.2f}x"

            lines.append(
                f"| {entry['description']} | {key} | {cell('sequential')} | {cell('vmap')} | "
                f"{cell('map')} | {cell('loop')} | {ratio('vmap')} | {ratio('map')} | "
                f"{ratio('loop')} | {row['best']} | {row.get('auto', '—')} |"
            )
    lines += [
        "",
        "| goal (issue #14, ratio = sequential / population) | model | N | ratio | target | "
        "result |",
        "|---|---|---|---|---|---|",
    ]
    for g in report["goals"]:
        ratio = "—" if g["ratio"] is None else f"{g['ratio']:.2f}"
        lines.append(
            f"| {g['goal']} | {g['model']} | {g['members']} | {ratio} | "
            f"{g['op']} {g['target']:g} | **{g['result']}** |"
        )
    return "\n".join(lines)
