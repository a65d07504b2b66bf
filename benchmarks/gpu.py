"""GPT-2-small training on one GPU in bfloat16: jaxtrain next to PyTorch (torch.compile).

jaxtrain trains its built-in `TransformerLM` at GPT-2 small's size
(`jaxtrain.models.lm.gpt2_small`: 12 layers, d_model 768, 12 heads, vocabulary 50,304,
context 1,024, tied embeddings, 124M parameters) with float32 parameters and AdamW state
and bfloat16 compute through its precision policy (``precision="bfloat16"``), attention
through `jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs), layers
scanned. PyTorch trains a model of the same shape and parameter count (fused q/k/v
projection, ``F.scaled_dot_product_attention(is_causal=True)``, tied embeddings) in
float32 under ``torch.autocast(bfloat16)`` with ``AdamW(fused=True)``, compiled with
``torch.compile`` (and, as a second row, eager), on the same GPU and the same token
batches, with the same AdamW hyperparameters. Contenders are timed interleaved after a
warm-up (compilation excluded); each timed section ends with a device sync
(``jax.block_until_ready`` / ``torch.cuda.synchronize``); reported are medians of repeats.

Reported per contender: step time, tokens/s and model FLOPs utilisation (MFU) over the
chip's dense bfloat16 peak (`jaxtrain.perf.PEAKS`), with FLOPs per step from

* the analytic count per token, ``6 N + 12 L T d`` (N: parameters used in matrix
  products, i.e. all but the position table; the tied token table is the output
  projection; ``12 L T d``: attention's T x T products, forward and backward) — the
  headline MFU, and ``6 N`` alone, the conventional numerator;
* XLA's cost analysis of jaxtrain's compiled step (``compiled.cost_analysis()``), as XLA
  reports it. It is known to undercount: on GPUs it misses matrix products that became
  cuBLAS/cuDNN calls, and it counts a scanned loop's body once (not L times);
* jaxtrain's jaxpr count (`jaxtrain.perf.step_flops`), for comparison with the rest of
  jaxtrain.

    python benchmarks/gpu.py                 # one GPU: about 2-3 minutes on an H100/H200
    python benchmarks/gpu.py --size tiny     # CPU smoke run (the test suite runs this)
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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, Any]] = {
    # GPT-2 small at context 1,024, 32 sequences (32,768 tokens) per step: about 28 TFLOP
    # per step by 6N + attention, ~60 ms per step at 45% MFU on an H100/H200. Compilation
    # (jaxtrain ~30 s with the layers scanned, torch.compile ~1-2 min) dominates the run.
    "full": dict(
        vocab=50304,
        d_model=768,
        heads=12,
        layers=12,
        seq=1024,
        batch=32,
        steps=10,
        repeats=5,
        warmup=2,
        batches=4,
    ),
    "tiny": dict(
        vocab=128,
        d_model=32,
        heads=2,
        layers=2,
        seq=16,
        batch=4,
        steps=3,
        repeats=2,
        warmup=1,
        batches=2,
    ),
}
# AdamW as GPT-2-style training sets it, the same on both sides.
LEARNING_RATE = 3e-4
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
MFU_GOAL = 0.45

LABELS = {
    "jaxtrain": "jaxtrain `train_step`, f32 params, bf16 policy",
    "torch_compile": "PyTorch `torch.compile`, bf16 autocast, fused AdamW",
    "torch_eager": "PyTorch eager, bf16 autocast, fused AdamW",
}


def analytic_flops(cfg: Mapping[str, int], n_matmul: int) -> tuple[float, float]:
    """``(6 N, 6 N + 12 L T d)`` FLOPs per *token* (a multiply-add counts 2)."""
    six_n = 6.0 * n_matmul
    return six_n, six_n + 12.0 * cfg["layers"] * cfg["seq"] * cfg["d_model"]


def xla_flops(compiled: Any) -> float | None:
    """``flops`` of a compiled program's cost analysis (a dict or a list of dicts)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    try:
        flops = float(cost["flops"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return flops if flops > 0 else None


def torch_gpt(cfg: Mapping[str, int]):
    """PyTorch model of `jaxtrain.models.TransformerLM`'s shape and parameter count (tied)."""
    from torch import nn
    from torch.nn import functional as F

    d, v, t, n = cfg["d_model"], cfg["vocab"], cfg["seq"], cfg["heads"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            # Flax LayerNorm's epsilon is 1e-6; its GELU is the tanh approximation.
            self.ln1 = nn.LayerNorm(d, eps=1e-6)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d, eps=1e-6)
            self.fc1 = nn.Linear(d, 4 * d)
            self.fc2 = nn.Linear(4 * d, d)

        def forward(self, x):
            b, s, _ = x.shape
            qkv = self.qkv(self.ln1(x)).view(b, s, 3, n, d // n)
            q, k, val = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, N, T, H]
            y = F.scaled_dot_product_attention(q, k, val, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(v, d)
            nn.init.normal_(self.tok.weight, std=0.02)  # as jaxtrain's tied embedding
            self.pos = nn.Embedding(t, d)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln = nn.LayerNorm(d, eps=1e-6)

        def forward(self, tokens):
            x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]][None]
            for block in self.blocks:
                x = block(x)
            return F.linear(self.ln(x), self.tok.weight)  # tied output projection

    return GPT()


def stats(times: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="full")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed section")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--out", default="benchmarks/gpu_results.json", help="JSON output path")
    ap.add_argument("--no-torch", action="store_true", help="only jaxtrain")
    ap.add_argument(
        "--torch-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile contender: auto = on a GPU only (on a CPU, torch.compile "
        "builds C++ kernels for minutes; the CPU smoke run uses eager only)",
    )
    ap.add_argument("--attention", default="auto", help="TransformerLM(attention=...)")
    ap.add_argument("--remat", default=None, help="TransformerLM(remat=...): a policy name")
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers instead of nn.scan")
    ap.add_argument(
        "--torch-threads", type=int, default=None, help="PyTorch CPU threads (CPU runs only)"
    )
    args = ap.parse_args(argv)
    cfg = dict(SIZES[args.size])
    for key in ("steps", "repeats", "batch"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{key} must be >= 1; got {value}.")
            cfg[key] = value
    return args, cfg


def jax_contender(args, cfg, batches, report) -> Callable[[], float]:
    """Builds jaxtrain's model, step and state; fills report's model and FLOP fields."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxtrain as jt
    from jaxtrain.models.lm import TransformerLM, attention_implementation
    from jaxtrain.perf import step_flops

    module = TransformerLM(
        vocab_size=cfg["vocab"],
        max_len=cfg["seq"],
        d_model=cfg["d_model"],
        num_heads=cfg["heads"],
        num_layers=cfg["layers"],
        tie_embeddings=True,
        scan_layers=not args.no_scan,
        remat=args.remat,
        attention=args.attention,
    )
    model = jt.from_linen(module)
    params, _ = jax.jit(model.init)(jax.random.key(0), batches[0]["x"])
    n_total = int(sum(x.size for x in jax.tree.leaves(params)))
    # The position table is a lookup; the tied token table is also the output projection.
    n_matmul = n_total - int(params["Embed_1"]["embedding"].size)

    def loss_fn(p, batch):
        logits, _ = model.apply(p, {}, batch["x"], train=True)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["y"]
        ).mean()

    tx = optax.adamw(LEARNING_RATE, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY)
    step = jt.make_train_step(loss_fn, tx, precision="bfloat16")
    box = {"state": jt.TrainState.create(params, tx, 0)}
    t0 = time.perf_counter()
    # Compiles once (the calls below reuse the executable) and counts the jaxpr's FLOPs.
    flops_jaxpr = step_flops(step, box["state"], batches[0])
    compiled = step.lower(box["state"], batches[0]).compile()
    compile_s = time.perf_counter() - t0
    head_dim = cfg["d_model"] // cfg["heads"]
    # What the step really runs, read from its bf16 forward's jaxpr ("auto" may have
    # fallen back to XLA at trace time), next to what "auto" asks for on this backend.
    forward = jax.make_jaxpr(
        lambda p: module.apply(
            {"params": jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)}, batches[0]["x"]
        )
    )(jax.eval_shape(lambda: params))
    used = "cudnn" if "dot_product_attention_fwd" in str(forward) else "xla"
    report["model"] = {
        "params": n_total,
        "params_matmul": n_matmul,
        "tokens_per_step": cfg["batch"] * cfg["seq"],
        "attention_implementation": used,
        "attention_requested": args.attention,
        "attention_auto_choice": attention_implementation("auto", jnp.bfloat16, head_dim),
        "scan_layers": not args.no_scan,
        "remat": args.remat,
    }
    report["jax_extra"] = {
        "flops_per_step_xla": xla_flops(compiled),
        "flops_per_step_jaxpr": flops_jaxpr,
        "compile_s": compile_s,
        "step": step,
    }

    def run() -> float:
        state = box["state"]
        for i in range(cfg["steps"]):
            state, metrics = step(state, batches[i % len(batches)])
        box["state"] = state
        jax.block_until_ready((state, metrics))
        return float(metrics["loss"])

    return run


def torch_contenders(args, cfg, host, platform_name) -> dict[str, Any]:
    """``{name: runner or 'status' string}`` for PyTorch compiled and eager."""
    import torch
    from torch.nn import functional as F

    if platform_name == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("JAX sees a GPU but torch.cuda.is_available() is False")
        tdev = torch.device("cuda")
    else:
        tdev = torch.device("cpu")
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
    v = cfg["vocab"]
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

    def make(compiled: bool) -> Callable[[], float]:
        torch.manual_seed(0)
        net = torch_gpt(cfg).to(tdev).train()
        try:
            opt = torch.optim.AdamW(
                net.parameters(),
                lr=LEARNING_RATE,
                betas=BETAS,
                weight_decay=WEIGHT_DECAY,
                fused=True,
            )
        except (RuntimeError, TypeError):  # no fused AdamW on this device
            opt = torch.optim.AdamW(
                net.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY
            )
        fwd = torch.compile(net) if compiled else net

        def run() -> float:
            for i in range(cfg["steps"]):
                x, y = tbatches[i % len(tbatches)]
                opt.zero_grad(set_to_none=True)
                with torch.autocast(tdev.type, dtype=torch.bfloat16):
                    logits = fwd(x)
                loss = F.cross_entropy(logits.float().reshape(-1, v), y.reshape(-1))
                loss.backward()
                opt.step()
            sync()
            return float(loss.detach())

        run.params = sum(p.numel() for p in net.parameters())  # type: ignore[attr-defined]
        return run

    out: dict[str, Any] = {}
    use_compile = args.torch_compile == "on" or (
        args.torch_compile == "auto" and platform_name == "gpu"
    )
    if use_compile:
        out["torch_compile"] = make(True)
    else:
        out["torch_compile"] = (
            "skipped: CPU run (torch.compile builds C++ kernels for minutes there); "
            "--torch-compile on forces it"
        )
    out["torch_eager"] = make(False)
    return out


def measure(
    runners: dict[str, Callable[[], float]], cfg, statuses: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Warm-up (compilation: timed apart), then interleaved repeats, rotated each repeat.

    A PyTorch contender that fails (e.g. torch.compile without a C++ compiler) is dropped
    with its reason in ``statuses``; jaxtrain failing is an error.
    """
    rows: dict[str, dict[str, Any]] = {}
    for name, run in list(runners.items()):
        t1 = time.perf_counter()
        try:
            for _ in range(cfg["warmup"]):
                run()
        except Exception as e:
            if name == "jaxtrain":
                raise
            statuses[name] = f"unavailable: {type(e).__name__}: {e}".splitlines()[0][:200]
            print(f"[{name}] {statuses[name]}", file=sys.stderr)
            del runners[name]
            continue
        rows[name] = {"per_step_s": [], "warmup_s": time.perf_counter() - t1}
    names = list(runners)
    for r in range(cfg["repeats"]):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t1 = time.perf_counter()
            rows[name]["final_loss"] = runners[name]()
            rows[name]["per_step_s"].append((time.perf_counter() - t1) / cfg["steps"])
    return rows


def _mfu(flops: float | None, steps_per_s: float, peak: float | None) -> float | None:
    return flops * steps_per_s / peak if flops and peak else None


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two goals: MFU >= 45% and faster than torch.compile, with verdicts."""
    jx = report["contenders"]["jaxtrain"]
    tc = report["contenders"].get("torch_compile", {})
    mfu = jx.get("mfu_analytic")
    mfu_row = {
        "goal": "jaxtrain MFU (6N + attention) >= 45%",
        "measured": mfu,
        "result": "not measured (no peak for this device)"
        if mfu is None
        else ("MET" if mfu >= MFU_GOAL else "MISSED"),
    }
    if tc.get("status") == "ok":
        ratio = tc["median_s"] / jx["median_s"]
        speed = {"measured": ratio, "result": "MET" if ratio > 1 else "MISSED"}
    else:
        speed = {"measured": None, "result": f"not measured ({tc.get('status', 'no torch')})"}
    return [mfu_row, {"goal": "jaxtrain faster than PyTorch torch.compile (x)", **speed}]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = parse_args(argv)

    import jax

    import jaxtrain as jt
    from jaxtrain.models.lm import TransformerLM, remat_policy
    from jaxtrain.perf import peak_flops

    try:  # a bad name fails in one line, before anything compiles
        remat_policy(args.remat)
        TransformerLM(2, d_model=cfg["d_model"], num_heads=cfg["heads"], attention=args.attention)
    except ValueError as e:
        raise SystemExit(f"benchmarks/gpu.py: {e}") from None
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

    runners: dict[str, Callable[[], float]] = {
        "jaxtrain": jax_contender(args, cfg, batches, report)
    }
    statuses: dict[str, str] = {}
    torch_params = None
    if args.no_torch:
        statuses = {k: "skipped (--no-torch)" for k in ("torch_compile", "torch_eager")}
    else:
        try:
            import torch

            for name, r in torch_contenders(args, cfg, host, device.platform).items():
                if isinstance(r, str):
                    statuses[name] = r
                else:
                    runners[name] = r
                    torch_params = r.params  # type: ignore[attr-defined]
            report["versions"]["torch"] = torch.__version__
        except Exception as e:  # PyTorch missing or broken: say so in the table
            status = f"unavailable: {type(e).__name__}: {e}".splitlines()[0][:200]
            statuses = {k: status for k in ("torch_compile", "torch_eager")}
            print(f"[torch] {status}", file=sys.stderr)
    report["model"]["torch_params"] = torch_params

    rows = measure(runners, cfg, statuses)
    extra = report.pop("jax_extra")
    peak_f = peak["peak_flops_per_device"]
    tokens = report["model"]["tokens_per_step"]
    six_n, analytic = analytic_flops(cfg, report["model"]["params_matmul"])
    for name, row in rows.items():
        row.update(stats(row["per_step_s"]))
        sps = 1.0 / row["median_s"]
        row.update(
            status="ok",
            tokens_per_s=tokens * sps,
            flops_per_step_6n=six_n * tokens,
            flops_per_step_analytic=analytic * tokens,
            mfu_6n=_mfu(six_n * tokens, sps, peak_f),
            mfu_analytic=_mfu(analytic * tokens, sps, peak_f),
        )
        if name == "jaxtrain":
            row.update(
                flops_per_step_xla=extra["flops_per_step_xla"],
                mfu_xla=_mfu(extra["flops_per_step_xla"], sps, peak_f),
                flops_per_step_jaxpr=extra["flops_per_step_jaxpr"],
                mfu_jaxpr=_mfu(extra["flops_per_step_jaxpr"], sps, peak_f),
                compile_s=extra["compile_s"],
                compilations=extra["step"].trace_count,
            )
        report["contenders"][name] = row
    for name, status in statuses.items():
        report["contenders"][name] = {"status": status}
    report["goals"] = goals(report)
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
            f"{c['layers']} layers, vocab {c['vocab']}, seq {c['seq']}, batch {c['batch']}, "
            f"tied embeddings: {m['params']:,} parameters ({m['params_matmul']:,} in matrix "
            f"products; PyTorch: {twin}), {m['tokens_per_step']:,} tokens per step; "
            f"attention {m['attention_implementation']}, scan_layers {m['scan_layers']}, "
            f"remat {m['remat']}",
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
        f"{c['warmup']} warm-up sections (compilation excluded). MFU = FLOPs per step x "
        f"steps/s / peak ({report['device']['peak_source']}).",
        "",
        "| framework | step time | tokens/s | MFU (6N + attn) | MFU (6N) | MFU (XLA cost) "
        "| MFU (jaxpr) | compile (jaxtrain) or warm-up with compile (PyTorch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["contenders"].items():
        if row["status"] != "ok":
            lines.append(f"| {LABELS[name]} | {row['status']} | | | | | | |")
            continue
        compile_s = row.get("compile_s", row["warmup_s"])
        lines.append(
            f"| {LABELS[name]} | {_fmt(row['median_s'], '.2f', 1e3, ' ms')} | "
            f"{_fmt(row['tokens_per_s'], ',.0f')} | {_fmt(row['mfu_analytic'], '.1%')} | "
            f"{_fmt(row['mfu_6n'], '.1%')} | {_fmt(row.get('mfu_xla'), '.1%')} | "
            f"{_fmt(row.get('mfu_jaxpr'), '.1%')} | {_fmt(compile_s, '.1f', unit=' s')} |"
        )
    lines += ["", "| goal | measured | result |", "|---|---|---|"]
    for g in report["goals"]:
        spec = ".1%" if "MFU" in g["goal"] else ".2f"
        lines.append(f"| {g['goal']} | {_fmt(g['measured'], spec)} | **{g['result']}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
