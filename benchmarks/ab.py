#!/usr/bin/env python
"""Interleaved A/B timing of this working tree against a git revision of the library, on one machine.

    python benchmarks/ab.py --ref HEAD                      # the uncommitted change against the last commit
    python benchmarks/ab.py --ref 9164cf8 --what cell,vil_tiny_cifar,recipe_mnist --rounds 7 --tag division

A change worth a few % is below the noise of single throughput runs on a shared 2-core machine. Here every round
runs each side once, in a fresh subprocess each, alternating, and the report gives every round and the median ratio.
On a host whose speed drifts from one run to the next (by 10 % and more within minutes, sessions 39-40), a change of
1-2 % needs ``--interleave steps``: both sides stay up in their own processes and take turns step by step (only
one runs at a time), so a slow spell hits both alike; the report adds the median of the pairs' speedups:

    python benchmarks/ab.py --ref HEAD --what vil_tiny_cifar --precision fp32 --interleave steps --rounds 3 --pairs 30
``--ref`` is exported with ``git archive`` (its ``src/`` only), so both sides run the same scripts and settings.

What is timed (``--what``, comma-separated):
- ``cell``: forward + backward of the fast parallel mLSTM cell at ViL-T's head shape (B 128, H 4, T 64, DH 96),
  inputs as the ViL layer passes them (head views of token-major tensors); ``--precision`` bf16: under autocast.
- a config of ``throughput.py`` (``vil_tiny_cifar``, ``recipe_<name>``): a training step (forward, backward, AdamW),
  batch 128, as images per second, measured by ``throughput.worker_model`` (the fast path).
``--mode infer`` times forward passes without gradients instead (the cell: its forward alone).
Writes results/benchmarks/ab-<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# What both workers share: sys.path with this side's library first, threads, and the step to time:
# make_step() -> a function running one step of WHAT (the cell's forward (+ backward), or throughput.py's step)
HEADER = r'''
import argparse, json, statistics, sys, time, torch
sys.path.insert(0, SRC)
sys.path.insert(0, BENCH)
torch.set_num_threads(THREADS); torch.manual_seed(0)
low = PRECISION == "bf16"


def throughput_module():
    import throughput  # (it puts the working tree's src/ first on sys.path: put this side's back in front)
    sys.path.insert(0, SRC)
    throughput.load_recipe_configs()
    return throughput


def make_step():
    if WHAT != "cell":  # throughput.py's step, on the fast path
        throughput = throughput_module()
        return throughput.make_step(argparse.Namespace(
            config=throughput.resolve_config(WHAT), path="fast", official=None, kernel=None, device="cpu", batch=128,
            precision=PRECISION, mode=MODE))
    from vision_lstm.cell import mlstm_parallel
    B, T, H, DH = 128, 64, 4, 96
    dtype = torch.bfloat16 if low else torch.float32
    leaves = [torch.randn(B, T, H * DH, dtype=dtype, requires_grad=True) for _ in range(3)]
    gates = [torch.randn(B, H, T, requires_grad=True) for _ in range(2)]
    grad = torch.randn(B, H, T, DH, dtype=dtype)

    def step():
        heads = [t.view(B, T, H, DH).transpose(1, 2) for t in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low), torch.set_grad_enabled(MODE == "train"):
            out = mlstm_parallel(*heads, gates[0], gates[1] + 3.0)
        if MODE == "train":
            out.backward(grad)
    return step
'''

# --interleave runs: one run of SECONDS, its median step (the cell: ms; a config: throughput.worker_model's img/s)
WORKER = HEADER + r'''
if WHAT == "cell":
    step = make_step()
    for _ in range(2):
        step()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < SECONDS:
        t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    value = statistics.median(times) * 1e3
else:  # throughput.py's own training-step measurement, on the fast path
    throughput = throughput_module()
    value = throughput.worker_model(argparse.Namespace(
        config=throughput.resolve_config(WHAT), path="fast", official=None, kernel=None, device="cpu", batch=128,
        precision=PRECISION, mode=MODE, warmup=2, seconds=SECONDS, min_steps=3, max_steps=10 ** 9))["img_per_s"]
import vision_lstm
print(json.dumps({"value": value, "library": vision_lstm.__file__}))
'''

# --interleave steps: a server of steps. After 2 warm-up steps it says where its library is, then for each line
# "step" on stdin runs one step and answers its seconds, until stdin ends.
STEP_SERVER = HEADER + r'''
step = make_step()
for _ in range(2):
    step()
import vision_lstm
print(json.dumps({"library": vision_lstm.__file__}), flush=True)
for line in sys.stdin:
    t = time.perf_counter(); step(); print(time.perf_counter() - t, flush=True)
'''


def worker_code(template: str, src: Path, what: str, precision: str, seconds: float, threads: int, mode: str) -> str:
    return (f"SRC={str(src)!r}; BENCH={str(REPO / 'benchmarks')!r}; WHAT={what!r}; PRECISION={precision!r}; "
            f"SECONDS={seconds!r}; THREADS={threads!r}; MODE={mode!r}\n" + template)


def run_side(src: Path, what: str, precision: str, seconds: float, threads: int, mode: str = "train"
             ) -> tuple[float, str]:
    code = worker_code(WORKER, src, what, precision, seconds, threads, mode)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{what} failed for {src}:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    check_library(what, result["library"], src)
    return result["value"], result["library"]


def check_library(what: str, library: str, src: Path):
    if not Path(library).resolve().is_relative_to(src.resolve()):  # each side must time its own library
        raise SystemExit(f"{what}: timed the library at {library}, not the one in {src}")


def interleave_steps(sides: dict, what: str, precision: str, threads: int, mode: str, pairs: int
                     ) -> tuple[dict, dict]:
    """Both sides as step servers, alive at once (each in its own process, one step running at a time): `pairs`
    times, one step of each, alternating which goes first. A slow spell of a shared machine then hits both sides
    alike, where whole runs of several seconds each may land in different spells. -> ({side: [step seconds]},
    {side: library})."""
    servers, libraries = {}, {}
    try:
        for side, src in sides.items():  # started (and warmed up) one after the other
            servers[side] = subprocess.Popen(
                [sys.executable, "-c", worker_code(STEP_SERVER, src, what, precision, 0.0, threads, mode)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            first = servers[side].stdout.readline()
            if not first:
                raise SystemExit(f"{what} failed for {src}:\n{servers[side].stderr.read()[-2000:]}")
            libraries[side] = json.loads(first)["library"]
            check_library(what, libraries[side], src)
        times = {side: [] for side in sides}
        order = list(sides)
        for pair in range(pairs):
            for side in (order if pair % 2 == 0 else order[::-1]):
                servers[side].stdin.write("step\n")
                servers[side].stdin.flush()
                times[side].append(float(servers[side].stdout.readline()))
        return times, libraries
    finally:
        for server in servers.values():
            server.stdin.close()
            server.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", default="HEAD", help="git revision to compare the working tree with (default HEAD)")
    p.add_argument("--what", default="cell,vil_tiny_cifar", help="cell and/or throughput.py config names")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="default auto: as train.py's --precision auto (runtime.resolve_precision): bf16 where the "
                        "processor has bf16 matrix arithmetic and its bf16 products measure >= 1.5x fp32's, else fp32")
    p.add_argument("--mode", default="train", choices=["train", "infer"],
                   help="training steps (forward, backward, AdamW; the cell: forward + backward) or inference")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per side and round (after 2 warm-ups)")
    p.add_argument("--interleave", default="runs", choices=["runs", "steps"],
                   help="runs: each side runs --seconds in a fresh process, one after the other; steps: both sides "
                        "stay up as step servers and alternate step by step (--pairs steps each per round), which "
                        "a noisy shared machine's slow spells disturb far less")
    p.add_argument("--pairs", type=int, default=30, help="--interleave steps: steps per side and round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="latest")
    p.add_argument("--out-dir", default=str(REPO / "results" / "benchmarks"))
    args = p.parse_args()
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "--verify", args.ref + "^{commit}"],
                           capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"--ref {args.ref!r} is not a commit of {REPO}: give a revision git knows (HEAD, a sha, a "
                         "branch)")
    ref_sha = found.stdout.strip()
    import torch
    from throughput import code_revision  # benchmarks/ is this script's folder, first on sys.path
    from vision_lstm.runtime import cpu_details, device_name, resolve_precision
    if args.precision == "auto":
        args.precision, note = resolve_precision("auto")
        print(note, flush=True)
    report = {"command": "python benchmarks/ab.py " + " ".join(sys.argv[1:]), "ref": ref_sha,
              "tree": code_revision(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "precision": args.precision, "mode": args.mode,
              "machine": {"cpu": device_name("cpu"), "cpu_details": cpu_details(), "threads": args.threads, "torch": torch.__version__,
                          "python": platform.python_version()}, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref_sha, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        sides = {"tree": REPO / "src", "ref": Path(tmp) / "src"}
        for what in args.what.split(","):
            values, libraries, pair_ratios = {"tree": [], "ref": []}, {}, []
            for r in range(args.rounds):
                order = ("tree", "ref") if r % 2 == 0 else ("ref", "tree")
                if args.interleave == "steps":
                    times, libraries = interleave_steps({side: sides[side] for side in order}, what, args.precision,
                                                        args.threads, args.mode, args.pairs)
                    for side in order:  # as the runs' values: the cell in ms, a config in img/s
                        median = statistics.median(times[side])
                        values[side].append(median * 1e3 if what == "cell" else 128 / median)
                    pair_ratios += [b / a for a, b in zip(times["tree"], times["ref"])]  # ref's time / tree's
                else:
                    for side in order:
                        value, libraries[side] = run_side(sides[side], what, args.precision, args.seconds,
                                                          args.threads, args.mode)
                        values[side].append(value)
                print(what, r, {k: round(v[-1], 2) for k, v in values.items()}, flush=True)
            if what == "cell":
                unit = "ms per forward + backward" if args.mode == "train" else "ms per forward"
            else:
                unit = "img/s (training step)" if args.mode == "train" else "img/s (inference)"
            faster = [(b / a if what == "cell" else a / b) for a, b in zip(values["tree"], values["ref"])]
            report["results"].append({"what": what, "unit": unit, "libraries": libraries,
                                      "tree": values["tree"], "ref": values["ref"],
                                      "speedup_per_round": faster, "median_speedup": statistics.median(faster)})
            if pair_ratios:  # each pair's speedup (ref's step time / tree's), all rounds
                quartiles = statistics.quantiles(pair_ratios, n=4)
                report["results"][-1].update(pair_speedups=pair_ratios, pair_median=statistics.median(pair_ratios),
                                             pair_quartiles=[quartiles[0], quartiles[2]])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ab-{args.tag}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# A/B: working tree ({report['tree']}) vs {ref_sha} ({report['date']})", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Precision: {args.precision}; mode: {args.mode}; " + (
                 "each round runs both sides once, alternating which goes first, each in a fresh process; a value is "
                 "the median step of that run." if args.interleave == "runs" else
                 f"each round starts both sides as step servers (fresh processes) and runs {args.pairs} pairs of "
                 "steps, one of each side, alternating which goes first; a value is a side's median step of that "
                 "round; the pairs' speedups (ref's step time / tree's) are summarised below the table."), "",
             "| what | unit | tree (per round) | ref (per round) | speedup per round | median speedup |",
             "|---|---|---|---|---|---|"]
    for res in report["results"]:
        fmt = lambda vs: " / ".join(f"{v:.1f}" for v in vs)  # noqa: E731
        per_round = " / ".join(f"{s:.3f}" for s in res["speedup_per_round"])
        lines.append(f"| {res['what']} | {res['unit']} | {fmt(res['tree'])} | {fmt(res['ref'])} | {per_round} | "
                     f"**{res['median_speedup']:.3f}** |")
    for res in report["results"]:
        if "pair_median" in res:
            lines.append(f"\n{res['what']}: median speedup of the {len(res['pair_speedups'])} pairs "
                         f"**{res['pair_median']:.3f}** (quartiles {res['pair_quartiles'][0]:.3f} to "
                         f"{res['pair_quartiles'][1]:.3f})")
    (out / f"ab-{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
