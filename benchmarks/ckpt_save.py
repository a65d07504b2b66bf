"""How long a checkpoint save blocks training: sharded save against a gathering save.

One process with N virtual CPU devices (``--devices``, FSDP over all of them), states of
several sizes (params + Adam's two moments), two ways of saving, interleaved within each
repeat (the order rotated from repeat to repeat) after a warm-up:

* ``sharded``: `jaxtrain.checkpoint.Checkpointer.save` (issue 13): orbax gets the
  ``jax.Array`` s as they are sharded and copies each process's own shards to the host;
  the per-array digests are computed on the devices and read back, with the metadata,
  in orbax's background commit.
* ``gathering``: what `Checkpointer.save` did before issue 13: the whole state copied to
  host numpy (``process_allgather`` across processes), a SHA-256 over every byte on the
  training thread, then the asynchronous orbax write of the host copy.

For each it reports the median (min-max) time ``save`` blocks the caller and the peak
RSS increase of the process during the save and its commit (Linux: VmHWM after
resetting it). Prints a markdown table and writes everything as JSON.

    python benchmarks/ckpt_save.py                      # 16, 64, 256 MiB; ~2 min on 2 cores
    python benchmarks/ckpt_save.py --size tiny          # smoke size (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

SIZES_MIB = {"full": (16, 64, 256), "tiny": (1,)}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES_MIB), default="full")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", type=int, default=4, help="virtual CPU devices (FSDP axis)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def _rss(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_increase(fn):
    """(peak RSS above the RSS before ``fn`` in bytes, or None off Linux; fn's result)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM
    except OSError:
        return None, fn()
    before = _rss("VmRSS")
    out = fn()
    after = _rss("VmHWM")
    return (None if before is None or after is None else after - before), out


def _mem(x: dict, row: dict) -> str:
    b = x["peak_rss_increase_bytes"]
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB ({b / row['state_bytes']:.2f}x)"


def main() -> None:
    args = _parse()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    import jax
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp

    import jaxtrain as jt
    from jaxtrain.checkpoint import Checkpointer, _host_leaf, state_digest
    from jaxtrain.parallel import init_sharded, make_mesh

    mesh = make_mesh(fsdp=jax.device_count())

    def make_state(mib: int):
        # Two square kernels; with Adam's mu and nu the state is 3x their size.
        side = int((mib * 2**20 / 3 / 2 / 4) ** 0.5) // 64 * 64

        def create():
            k1, k2 = jax.random.split(jax.random.key(0))
            params = {
                "a": jax.random.normal(k1, (side, side), jnp.float32),
                "b": jax.random.normal(k2, (side, side), jnp.float32),
            }
            return jt.TrainState.create(params, optax.adam(1e-3), 0, copy=False)

        state = init_sharded(create, mesh)
        return jax.block_until_ready(state)

    def gathering_save(manager, step, state):
        """The pre-issue-13 save: whole host copy + SHA-256 on the caller's thread."""
        keyless = jax.tree.map(
            lambda x: (
                jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            ),
            state,
        )
        host = jax.tree.map(_host_leaf, keyless)
        meta = {"state_sha256": state_digest(host)}
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)
            ),
        )

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mib in SIZES_MIB[args.size]:
            state = make_state(mib)
            nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
            sharded = Checkpointer(os.path.join(tmp, f"s{mib}"), keep_last=1)
            manager = ocp.CheckpointManager(
                os.path.join(tmp, f"g{mib}"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, enable_async_checkpointing=True
                ),
            )
            times: dict[str, list[float]] = {"sharded": [], "gathering": []}
            peaks: dict[str, list[int]] = {"sharded": [], "gathering": []}

            def run(kind, step, sharded=sharded, manager=manager, state=state) -> float:
                t = time.perf_counter()
                if kind == "sharded":
                    sharded.save(step, state)
                else:
                    gathering_save(manager, step, state)
                blocked = time.perf_counter() - t
                (sharded.wait if kind == "sharded" else manager.wait_until_finished)()
                return blocked

            run("sharded", 0)  # warm-up: compiles the digests, starts orbax's threads
            run("gathering", 0)
            for r in range(args.repeats):
                kinds = ["sharded", "gathering"] if r % 2 == 0 else ["gathering", "sharded"]
                for kind in kinds:
                    peak, blocked = _peak_increase(lambda k=kind, s=r + 1: run(k, s))
                    times[kind].append(blocked)
                    if peak is not None:
                        peaks[kind].append(peak)
            sharded.close()
            manager.close()
            row = {"state_mib": nbytes / 2**20, "state_bytes": int(nbytes)}
            for kind in times:
                row[kind] = {
                    "median_s": statistics.median(times[kind]),
                    "min_s": min(times[kind]),
                    "max_s": max(times[kind]),
                    "peak_rss_increase_bytes": max(peaks[kind]) if peaks[kind] else None,
                }
            results.append(row)

    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "orbax": getattr(ocp, "__version__", None),
        "devices": jax.device_count(),
        "repeats": args.repeats,
    }
    print(f"machine: {json.dumps(machine)}")
    print(
        "| state | sharded save blocks | gathering save blocks | ratio | sharded peak RSS "
        "| gathering peak RSS |"
    )
    print("|---|---|---|---|---|---|")
    for row in results:
        s, g = row["sharded"], row["gathering"]
        print(
            f"| {row['state_mib']:.0f} MiB | {s['median_s'] * 1e3:.1f} ms "
            f"({s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}) | {g['median_s'] * 1e3:.1f} ms "
            f"({g['min_s'] * 1e3:.1f}-{g['max_s'] * 1e3:.1f}) | "
            f"{g['median_s'] / s['median_s']:.1f}x | {_mem(s, row)} | {_mem(g, row)} |"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
