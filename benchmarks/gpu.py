"""Transformer LM training on one GPU in bfloat16: jaxtrain next to PyTorch eager.

jaxtrain's built-in `TransformerLM` trains with float32 parameters and Adam state and
bfloat16 compute through its mixed-precision policy (``precision="bfloat16"``: the step
casts the parameters to bfloat16 inside the differentiated function, so activations are
bfloat16 and gradients come back in float32). PyTorch
eager trains an equivalent transformer (same dimensions, same parameter count:
pre-LayerNorm blocks, ``nn.MultiheadAttention``, a 4x GELU MLP, learned positions) in
float32 under ``torch.autocast(bfloat16)`` with Adam, on the same GPU and the same
token batches. Both are timed interleaved after a warm-up; each timed section ends
with a device sync (``jax.block_until_ready`` / ``torch.cuda.synchronize``).

Reported per framework: step time, tokens/s, and model FLOPs utilisation (MFU) over the
chip's dense bfloat16 peak (`jaxtrain.perf.PEAKS`), with FLOPs per step from

* jaxtrain's count of the step's model FLOPs (`jaxtrain.perf.step_flops`: every matrix
  product and convolution in the step's jaxpr, attention's T x T products included,
  forward and backward; not elementwise work), and
* the analytic ``6 N`` per token (N: parameters outside the token and position
  embedding tables; forward 2N + backward 4N multiply-add FLOPs per token), the
  conventional MFU numerator, which ignores attention's T x T products; the JSON also
  gives ``6 N + 12 L T d`` (attention included).

    python benchmarks/gpu.py                 # one GPU; sized for < 5 min on an H100
    python benchmarks/gpu.py --size tiny     # a CPU smoke run (the test suite runs this)
"""

from __future__ import annotations

import os

# JAX preallocates 75% of GPU memory by default, which would leave PyTorch, in the same
# process, almost nothing. Allocate on demand instead (set before jax is imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import math
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, int]] = {
    # ~185M parameters outside the embeddings, 16k tokens per step: about 18 TFLOP per
    # step by 6N, tens of milliseconds on an H100; compiling the unrolled 12 layers takes
    # the largest share of the few minutes.
    "full": dict(
        vocab=32768,
        d_model=1024,
        heads=16,
        layers=12,
        seq=512,
        batch=32,
        steps=20,
        repeats=3,
        warmup=2,
        batches=4,
    ),
    "tiny": dict(
        vocab=128,
        d_model=32,
        heads=2,
        layers=1,
        seq=16,
        batch=4,
        steps=3,
        repeats=1,
        warmup=1,
        batches=2,
    ),
}
LEARNING_RATE = 3e-4


def count_params(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def embedding_params(params) -> int:
    """Parameters of the token and position embedding tables (lookups, not matmuls)."""
    return int(sum(np.prod(v["embedding"].shape) for k, v in params.items() if "Embed" in k))


def torch_lm(cfg: dict[str, int]):
    """PyTorch twin of `jaxtrain.models.TransformerLM` with the same dimensions and parameters."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    d, v, t = cfg["d_model"], cfg["vocab"], cfg["seq"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            # Flax LayerNorm's epsilon is 1e-6; its GELU is the tanh approximation.
            self.ln1 = nn.LayerNorm(d, eps=1e-6)
            self.attn = nn.MultiheadAttention(d, cfg["heads"], batch_first=True)
            self.ln2 = nn.LayerNorm(d, eps=1e-6)
            self.fc1 = nn.Linear(d, 4 * d)
            self.fc2 = nn.Linear(4 * d, d)

        def forward(self, x, mask):
            h = self.ln1(x)
            h, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)
            x = x + h
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(v, d)
            self.pos = nn.Embedding(t, d)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln = nn.LayerNorm(d, eps=1e-6)
            self.head = nn.Linear(d, v)
            self.register_buffer(
                "mask", torch.triu(torch.ones(t, t, dtype=torch.bool), 1), persistent=False
            )

        def forward(self, tokens):
            n = tokens.shape[1]
            x = self.tok(tokens) + self.pos.weight[:n][None]
            for block in self.blocks:
                x = block(x, self.mask[:n, :n])
            return self.head(self.ln(x))

    return LM()


def stats(times: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="full")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed section")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--out", default="benchmarks/gpu_results.json", help="JSON output path")
    ap.add_argument("--no-torch", action="store_true", help="only jaxtrain")
    ap.add_argument(
        "--torch-threads", type=int, default=None, help="PyTorch CPU threads (CPU runs only)"
    )
    args = ap.parse_args(argv)
    cfg = dict(SIZES[args.size])
    for key in ("steps", "repeats", "batch"):
        if getattr(args, key) is not None:
            if getattr(args, key) < 1:
                raise SystemExit(f"--{key} must be >= 1; got {getattr(args, key)}.")
            cfg[key] = getattr(args, key)

    import jax
    import jax.numpy as jnp
    import optax

    import jaxtrain as jt
    from jaxtrain.perf import peak_flops, step_flops

    device = jax.devices()[0]
    if args.size == "full" and device.platform != "gpu":
        raise SystemExit(
            f"benchmarks/gpu.py --size full needs a GPU, but JAX's default device is "
            f"{device.platform} ({device.device_kind}). Fix: run it on a GPU machine with a "
            "CUDA jax (check with `jaxtrain doctor --expect gpu`), or use --size tiny for a "
            "CPU smoke run."
        )
    peak = peak_flops(device)
    report: dict[str, Any] = {
        "device": {
            "platform": device.platform,
            "device_kind": device.device_kind,
            "peak_flops": peak["peak_flops_per_device"],
            "peak_source": peak["source"],
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxtrain": jt.__version__,
        },
        "config": cfg,
        "contenders": {},
    }

    b, t, v = cfg["batch"], cfg["seq"], cfg["vocab"]
    rng = np.random.default_rng(0)
    host = [rng.integers(0, v, size=(b, t + 1), dtype=np.int32) for _ in range(cfg["batches"])]
    batches = [jax.device_put({"x": h[:, :-1], "y": h[:, 1:]}) for h in host]
    tokens_per_step = b * t

    module = jt.models.TransformerLM(
        vocab_size=v,
        max_len=t,
        d_model=cfg["d_model"],
        num_heads=cfg["heads"],
        num_layers=cfg["layers"],
    )
    model = jt.from_linen(module)
    params, _ = model.init(jax.random.key(0), batches[0]["x"])
    n_total = count_params(params)
    n_dense = n_total - embedding_params(params)
    flops_6n = 6.0 * n_dense * tokens_per_step
    flops_6n_attn = flops_6n + 12.0 * cfg["layers"] * t * cfg["d_model"] * tokens_per_step

    def loss_fn(p, batch):
        logits, _ = model.apply(p, {}, batch["x"], train=True)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["y"]
        ).mean()

    tx = optax.adam(LEARNING_RATE)
    # jaxtrain's own mixed-precision policy: float32 parameters and Adam state in the
    # TrainState, the cast to bfloat16 inside the differentiated function (so gradients
    # come back in float32); the token ids are integers and stay as they are.
    step = jt.make_train_step(loss_fn, tx, precision="bfloat16")
    box = {"state": jt.TrainState.create(params, tx, 0)}
    t0 = time.perf_counter()
    # Compile once, ahead of time, and count the step's model FLOPs from its jaxpr (XLA's
    # GPU cost analysis misses the matmuls that became cuBLAS calls: ~3x too few).
    flops_jaxpr = step_flops(step, box["state"], batches[0])
    state, metrics = step(box["state"], batches[0])
    jax.block_until_ready(metrics)
    box["state"] = state
    compile_s = time.perf_counter() - t0

    def run_jax():
        state = box["state"]
        for i in range(cfg["steps"]):
            state, metrics = step(state, batches[i % len(batches)])
        box["state"] = state
        jax.block_until_ready((state, metrics))
        return float(metrics["loss"])

    runners = {"jaxtrain": run_jax}
    torch_status = "ok"
    n_torch = None
    if args.no_torch:
        torch_status = "skipped (--no-torch)"
    else:
        try:
            import torch
            from torch.nn import functional as F

            if device.platform == "gpu":
                if not torch.cuda.is_available():
                    raise RuntimeError("JAX sees a GPU but torch.cuda.is_available() is False")
                tdev = torch.device("cuda")
            else:
                tdev = torch.device("cpu")
                if args.torch_threads:
                    torch.set_num_threads(args.torch_threads)
            torch.manual_seed(0)
            net = torch_lm(cfg).to(tdev).train()
            n_torch = sum(p.numel() for p in net.parameters())
            opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
            tbatches = [
                (
                    torch.from_numpy(h[:, :-1].astype(np.int64)).to(tdev),
                    torch.from_numpy(h[:, 1:].astype(np.int64)).to(tdev),
                )
                for h in host
            ]

            def sync():
                if tdev.type == "cuda":
                    torch.cuda.synchronize()

            def run_torch():
                for i in range(cfg["steps"]):
                    x, y = tbatches[i % len(tbatches)]
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(tdev.type, dtype=torch.bfloat16):
                        logits = net(x)
                    loss = F.cross_entropy(logits.float().reshape(-1, v), y.reshape(-1))
                    loss.backward()
                    opt.step()
                sync()
                return float(loss.detach())

            runners["torch_eager"] = run_torch
            report["versions"]["torch"] = torch.__version__
        except Exception as e:
            torch_status = f"unavailable: {type(e).__name__}: {e}".splitlines()[0][:200]
            print(f"[torch_eager] {torch_status}", file=sys.stderr)

    warm: dict[str, float] = {}
    for name, run in runners.items():
        t1 = time.perf_counter()
        for _ in range(cfg["warmup"]):
            run()
        warm[name] = time.perf_counter() - t1
    times: dict[str, list[float]] = {name: [] for name in runners}
    losses: dict[str, float] = {}
    names = list(runners)
    for r in range(cfg["repeats"]):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t1 = time.perf_counter()
            losses[name] = runners[name]()
            times[name].append((time.perf_counter() - t1) / cfg["steps"])

    peak_f = peak["peak_flops_per_device"]
    for name in runners:
        st = stats(times[name])
        sps = 1.0 / st["median_s"]
        row: dict[str, Any] = {
            "status": "ok",
            "per_step_s": times[name],
            **st,
            "tokens_per_s": tokens_per_step * sps,
            "warmup_s": warm[name],
            "final_loss": losses[name],
            "flops_per_step_6n": flops_6n,
            "flops_per_step_6n_attention": flops_6n_attn,
            "mfu_6n": flops_6n * sps / peak_f if peak_f else None,
        }
        if name == "jaxtrain":
            row["flops_per_step_jaxpr"] = flops_jaxpr
            row["mfu_jaxpr"] = flops_jaxpr * sps / peak_f if peak_f and flops_jaxpr else None
            row["compile_and_first_step_s"] = compile_s
            row["compilations"] = step.trace_count
        report["contenders"][name] = row
    if "torch_eager" not in runners:
        report["contenders"]["torch_eager"] = {"status": torch_status}
    report["model"] = {
        "params": n_total,
        "params_outside_embeddings": n_dense,
        "torch_params": n_torch,
        "tokens_per_step": tokens_per_step,
    }
    report["markdown"] = markdown(report)
    print(header(report))
    print()
    print(report["markdown"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from jaxtrain.writers import dumps_strict  # strict JSON: no NaN tokens

        with open(args.out, "w") as f:
            f.write(dumps_strict(report, indent=1, default=float))
        print(f"wrote {args.out}")
    return report


def header(report: dict[str, Any]) -> str:
    d, c, m = report["device"], report["config"], report["model"]
    twin = "—" if m["torch_params"] is None else f"{m['torch_params']:,}"
    return "\n".join(
        [
            f"device: {d['platform']} {d['device_kind']}; peak: {d['peak_source']}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
            f"model: TransformerLM d_model {c['d_model']}, {c['heads']} heads, "
            f"{c['layers']} layers, vocab {c['vocab']}, seq {c['seq']}, batch {c['batch']}: "
            f"{m['params']:,} parameters ({m['params_outside_embeddings']:,} outside the "
            f"embeddings; PyTorch twin: {twin}), "
            f"{m['tokens_per_step']:,} tokens per step",
        ]
    )


def _fmt(x: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x * scale:{spec}}{unit}"


def markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"Median over {c['repeats']} interleaved repeats of {c['steps']} steps, after "
        f"{c['warmup']} warm-up sections. MFU = FLOPs per step x steps/s / peak "
        f"({report['device']['peak_source']}).",
        "",
        "| framework | step time | tokens/s | FLOPs/step (jaxpr) | MFU (jaxpr) | "
        "FLOPs/step (6N) | MFU (6N) |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "jaxtrain": "jaxtrain `train_step`, f32 params, bf16 compute",
        "torch_eager": "PyTorch eager, f32 params, bf16 autocast",
    }
    for name, row in report["contenders"].items():
        if row["status"] != "ok":
            lines.append(f"| {labels[name]} | {row['status']} | | | | | |")
            continue
        lines.append(
            f"| {labels[name]} | {_fmt(row['median_s'], '.2f', 1e3, ' ms')} | "
            f"{_fmt(row['tokens_per_s'], ',.0f')} | "
            f"{_fmt(row.get('flops_per_step_jaxpr'), '.3g')} | "
            f"{_fmt(row.get('mfu_jaxpr'), '.1%')} | {_fmt(row['flops_per_step_6n'], '.3g')} | "
            f"{_fmt(row['mfu_6n'], '.1%')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
