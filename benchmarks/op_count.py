#!/usr/bin/env python
"""Count the ATen operations of one ViL-T training step (forward + backward) and one inference pass, per path.

On a GPU at small batch every operation is one or more kernel launches, and launches, not arithmetic, set the
time (results/benchmarks/gpu/README.md): this count, taken on the CPU in seconds, predicts how the paths rank there.
Views and allocations (which launch nothing) are not counted; the optimizer step is left out (the same for all).

    python benchmarks/op_count.py --official /tmp/official     # adds the official code (a checkout of NX-AI/vision-lstm)
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from throughput import REPO, build  # benchmarks/throughput.py: the same models as the speed benchmark

NOT_COUNTED = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.expand", "aten.permute",
               "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select", "aten.split", "aten.split_with_sizes",
               "aten.as_strided", "aten.detach", "aten.alias", "aten.empty", "aten.empty_like", "aten.empty_strided",
               "aten.unbind", "aten._reshape_alias", "aten.reshape", "aten.lift_fresh", "aten.chunk", "aten.narrow",
               "aten.diagonal", "aten.new_empty", "aten.new_empty_strided", "aten.unfold", "aten.movedim"}


class CountOps(TorchDispatchMode):
    """Counts the operations that run, by name (views and allocations aside)."""

    def __init__(self):
        super().__init__()
        self.by_name = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name not in NOT_COUNTED:
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))


def count(model: torch.nn.Module, precision: str, mode: str) -> Counter:
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    counter = CountOps()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with counter:
        if mode == "train":
            model.train()
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
        else:
            model.eval()
            with torch.no_grad(), autocast:
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.by_name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", help="a checkout of NX-AI/vision-lstm (adds the official code)")
    p.add_argument("--output", default=str(REPO / "results" / "benchmarks" / "op_count.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    paths = ["fast", "reference"] + (["official"] if args.official else [])
    lines = ["# ATen operations per ViL-T step (patch 4, 32x32, 12 block pairs)", "",
             f"Command: `python benchmarks/op_count.py{' --official ' + args.official if args.official else ''}` "
             f"(torch {torch.__version__}). Views and allocations are not counted, nor the optimizer step.", "",
             "| path | train fp32 (fwd + bwd) | train bf16 | infer fp32 | infer bf16 |", "|---|---|---|---|---|"]
    train_fp32 = {}  # path -> operations by name of an fp32 training step
    for path in paths:
        model, _ = build("vil_tiny_cifar", path, args.official, None)
        counts = [count(model, precision, mode) for mode in ("train", "infer") for precision in ("fp32", "bf16")]
        train_fp32[path] = counts[0]
        lines.append(f"| {path} | " + " | ".join(str(c.total()) for c in counts) + " |")
        print(lines[-1], flush=True)
    # Where the fast path's extra operations are: the names it runs most more often than the plain path.
    fast, plain = train_fp32["fast"], train_fp32["reference"]
    extra = sorted(fast.keys() | plain.keys(), key=lambda name: plain[name] - fast[name])[:8]
    lines += ["", "Operations of an fp32 training step that the fast path runs most more often than the reference "
              "path:", "", "| operation | fast | reference |", "|---|---|---|"]
    lines += [f"| {name} | {fast[name]} | {plain[name]} |" for name in extra]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
