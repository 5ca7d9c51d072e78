#!/usr/bin/env python
"""Matrix-product floor of a ViL training step: how fast could a step be if everything but its matrix products
were free?

    python benchmarks/floor.py                          # vil_tiny_cifar, batch 128, 2 threads
    python benchmarks/floor.py --config recipe_cifar10 --batch 256

It records every matrix product (mm, addmm, bmm, baddbmm) of one training step of the fast path under bf16
autocast, as the kernels receive them (shapes, strides, dtypes: dense projections in bf16, the mLSTM cell's T x T
products in bf16 but for its fp32 scores; on CPUs with AVX512-BF16 the cell's products run inside its fused
forward and backward kernels instead and are not recorded), re-times each alone, sums them, and compares the sum
with a measured training step of the same model. With the same products, that sum bounds the step from below: norms,
convolutions, gates, elementwise chains, optimizer and copies can only add to it. Writes
results/benchmarks/floor.{json,md}; the official code's images/s are read from results/benchmarks/throughput.json
when it holds them (the same machine, an earlier run).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # CONFIGS, build, load_recipe_configs; also puts src/ on the path

REPO = throughput.REPO


def best_ms(fn, seconds: float) -> float:
    """Fastest of repeated calls, in ms (the floor wants the product's own speed, not the machine's noise)."""
    for _ in range(3):
        fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1000 * best


MATMULS = ("mm", "addmm", "bmm", "baddbmm")


class TensorSig(NamedTuple):
    """A recorded tensor argument: enough to remake one like it."""
    shape: tuple
    stride: tuple
    dtype: str


def record_products(config: str, batch: int) -> Counter:
    """Every matrix product of one bf16-autocast training step of the fast path, as the kernels receive them:
    (op, ((shape, stride, dtype) of each tensor argument), scalars) -> how often. Convolutions are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model, shape = throughput.build(config, "fast", None)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    seen = Counter()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in MATMULS and not kwargs:
                sig = tuple(TensorSig(tuple(a.shape), a.stride(), str(a.dtype)[6:]) if torch.is_tensor(a) else a
                            for a in args)
                seen[(func.overloadpacket.__name__, sig)] += 1
            return func(*args, **(kwargs or {}))

    with Recorder():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    return seen


def time_product(op: str, sig: tuple, seconds: float) -> tuple[float, float]:
    """(ms, GFLOP) of one recorded product, re-run alone on random tensors with the recorded strides."""
    args = []
    for a in sig:
        if isinstance(a, TensorSig):
            t = torch.empty_strided(a.shape, a.stride, dtype=getattr(torch, a.dtype))
            args.append(t.normal_() if t.numel() else t)
        else:
            args.append(a)
    mats = [a for a in args if torch.is_tensor(a)][-2:]  # the two factors (addmm/baddbmm lead with the addend)
    *batch, n, k = mats[0].shape
    m = mats[1].shape[-1]
    flop = 2 * n * k * m * (batch[0] if batch else 1)
    func = getattr(torch.ops.aten, op)
    return best_ms(lambda: func(*args), seconds), flop / 1e9


def measured_step_ms(config: str, batch: int, steps: int) -> float:
    """Fastest of ``steps`` training steps (forward, backward, AdamW) on the fast path under bf16 autocast, timed by
    the throughput benchmark's own step loop. ms."""
    run = argparse.Namespace(config=config, path="fast", official=None, device="cpu", kernel=None, batch=batch,
                             precision="bf16", mode="train", warmup=2, seconds=0.0, min_steps=steps, max_steps=steps)
    return 1000 * throughput.worker_model(run)["best_step_s"]


def official_best(config: str) -> float | None:
    """The official code's best training images/s for ``config`` in results/benchmarks/throughput.json, if any."""
    path = REPO / "results" / "benchmarks" / "throughput.json"
    if not path.exists():
        return None
    rows = [r for r in json.loads(path.read_text())["models"]
            if r["config"] == config and r["path"] == "official" and r["mode"] == "train"]
    return max((r["img_per_s"] for r in rows), default=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="vil_tiny_cifar")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.0, help="time per product")
    p.add_argument("--steps", type=int, default=8, help="measured training steps")
    p.add_argument("--output", default=str(REPO / "results" / "benchmarks"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    throughput.load_recipe_configs()
    config = throughput.resolve_config(args.config)

    rows = []
    for (op, sig), count in sorted(record_products(config, args.batch).items(), key=lambda kv: str(kv[0])):
        ms, gflop = time_product(op, sig, args.seconds)
        tensors = [a for a in sig if isinstance(a, TensorSig)]
        rows.append({"op": op, "shapes": [list(t.shape) for t in tensors], "dtype": tensors[-1].dtype, "count": count,
                     "gflop": gflop * count, "ms": ms * count})
    floor_ms = sum(r["ms"] for r in rows)
    step_ms = measured_step_ms(config, args.batch, args.steps)
    official = official_best(config)
    from vision_lstm.runtime import device_name
    report = {"config": config, "batch": args.batch, "threads": args.threads, "torch": torch.__version__,
              "cpu": device_name("cpu"),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python benchmarks/floor.py " + " ".join(sys.argv[1:]), "rows": rows,
              "floor_ms": floor_ms, "step_ms": step_ms,
              "official_best_img_per_s": official}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "floor.json").write_text(json.dumps(report, indent=1))
    (out / "floor.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    B = r["batch"]
    by_dtype = Counter()
    for x in r["rows"]:
        by_dtype[x["dtype"]] += x["ms"]
    lines = [f"# Matrix-product floor of a training step ({r['date']})", "",
             f"Command: `{r['command']}`  ",
             (f"Config {r['config']}, batch {B}, {r['threads']} threads, CPU {r.get('cpu', 'not recorded')}, "
              f"torch {r['torch']}. Every matrix product of "
              "one fast-path training step under bf16 autocast, recorded as the kernels receive it (shapes, strides, "
              "dtype) and re-timed alone (fastest call). Convolutions are not counted."), "",
             "| op | operand shapes | dtype | per step | GFLOP per step | ms per step | GFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for x in sorted(r["rows"], key=lambda x: -x["ms"]):
        shapes = " x ".join(str(tuple(s)) for s in x["shapes"])
        lines.append(f"| {x['op']} | {shapes} | {x['dtype']} | {x['count']} | {x['gflop']:.2f} | {x['ms']:.1f} | "
                     f"{x['gflop'] / x['ms'] * 1000:.0f} |")
    split = ", ".join(f"{dtype} {ms:.0f} ms" for dtype, ms in sorted(by_dtype.items()))
    lines += ["", (f"- **Floor: {r['floor_ms']:.0f} ms per step = at most {1000 * B / r['floor_ms']:.0f} img/s** "
                   f"({split})."),
              (f"- Measured fast-path step (bf16 autocast, fastest of the measured steps): {r['step_ms']:.0f} ms = "
               f"{1000 * B / r['step_ms']:.1f} img/s; the products are {100 * r['floor_ms'] / r['step_ms']:.0f} % "
               "of it, everything else (norms, convolutions, gates, elementwise passes, copies, optimizer) the rest.")]
    if r["official_best_img_per_s"]:
        off = r["official_best_img_per_s"]
        lines.append(f"- The official code's best training speed in results/benchmarks/throughput.json: {off:.1f} "
                     f"img/s; 4x that is {4 * off:.0f} img/s = a step of {1000 * B / (4 * off):.0f} ms. With "
                     f"everything but these products free, a step would be {1000 * B / r['floor_ms'] / off:.2f}x "
                     "the official code.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
