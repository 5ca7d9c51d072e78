#!/usr/bin/env python
"""CPU throughput benchmark: matmul peak, train/inference images per second, peak memory, MFU, and the
sequence-length table of the three mLSTM forms. Every number comes from this one run; speedups are ratios of
paths timed side by side here.

    python benchmarks/throughput.py                       # all configs, writes results/benchmarks/
    python benchmarks/throughput.py --configs vil_tiny_cifar --paths fast,reference
    python benchmarks/throughput.py --official /path/to/NX-AI/vision-lstm   # adds the official code, same run
    python benchmarks/throughput.py --configs vil_tiny_cifar --paths fast,official --official ... --rounds 3
        # each measurement 3 times, rounds interleaved; the median round is reported (for a machine that drifts)
    python benchmarks/throughput.py --device cuda --paths fast,kernels --skip-seqlen   # a GPU; kernels: the
        # fast path with an mlstm_kernels kernel as the cell (--kernel, default the Triton chunkwise one)

Each measurement runs in a fresh subprocess (so peak memory is that measurement's own) with --threads threads.
"""
from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# Named model configurations: (registry name, overrides, input shape (C, H, W)).
CONFIGS = {
    # The configuration of the speed target: ViL-T with 4x4 patches on 32x32 images (5.85M params).
    "vil_tiny_cifar": ("vil_tiny", dict(img_size=32, patch_size=4, num_classes=10), (3, 32, 32)),
}

# Paths timed under torch.compile -> the path that builds their model.
COMPILED_PATHS = {"compiled": "fast", "official-compiled": "official"}


def load_recipe_configs():
    """Add the model of each shipped recipe (configs/*.yaml); recipes that share a model are measured once."""
    import yaml
    from vision_lstm.data import get_spec
    groups = {}
    for path in sorted((REPO / "configs").glob("*.yaml"), key=lambda p: len(p.stem)):
        recipe = yaml.safe_load(path.read_text())
        spec = get_spec(recipe["dataset"])
        C, H, W = spec.image_shape
        args = dict(img_size=H, in_chans=C, num_classes=len(spec.classes), **recipe.get("model_args", {}))
        args.pop("drop_path_rate", None)
        key = json.dumps([recipe["model"], args], sort_keys=True)
        groups.setdefault(key, (recipe["model"], args, (C, H, W), []))[3].append(path.stem)
    for model, args, shape, stems in groups.values():
        CONFIGS["recipe_" + "+".join(stems)] = (model, args, shape)


def code_revision() -> str:
    """The commit this checkout's library code is at, and whether src/ has uncommitted changes ("unknown" outside
    git): recorded with every benchmark, so a figure can be traced to its code."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True,
                           text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes in src/" if dirty else "")


def resolve_config(name: str) -> str:
    """A --configs entry -> its CONFIGS key; ``recipe_<stem>`` also names a group that holds that recipe."""
    if name in CONFIGS:
        return name
    for key in CONFIGS:
        if name.startswith("recipe_") and name[len("recipe_"):] in key[len("recipe_"):].split("+"):
            return key
    raise SystemExit(f"unknown config {name!r}; valid: {', '.join(CONFIGS)} (or recipe_<name of a configs/*.yaml>)")


# ---------------------------------------------------------------------------------------------------------------
# Workers (run in subprocesses)


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (Linux VmHWM), else since process start."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> float:
    """Reset the peak-RSS counter (Linux: write 5 to /proc/self/clear_refs); return the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def synchronize(device: str) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so wall-clock times cover the work itself."""
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_size(device: str) -> int:
    """Side of the square GEMM that measures the matmul peak: large enough to saturate the device."""
    return 2048 if device == "cpu" else 8192


def worker_matmul(args) -> dict:
    """GFLOP/s of a square GEMM in fp32 and bf16. Where a dtype is emulated (bf16 on a CPU without AVX512-BF16 or
    AMX: about 1 GFLOP/s on 2 cores, one 2048 GEMM ~15 s), the side shrinks until one product takes under ~1 s: the
    rate of such slow code hardly depends on the size, and the measurement stays a few seconds."""
    import torch
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        n = matmul_size(args.device)
        probe = min(n, 512)  # time one small product first, to size the real one
        a, b = (torch.randn(probe, probe, dtype=dtype, device=args.device) for _ in range(2))
        a @ b
        synchronize(args.device)
        t = time.perf_counter()
        a @ b
        synchronize(args.device)
        rate = 2 * probe ** 3 / max(time.perf_counter() - t, 1e-9)  # FLOP/s, roughly
        while n > 256 and 2 * n ** 3 / rate > 1.0:
            n //= 2
        a, b = (torch.randn(n, n, dtype=dtype, device=args.device) for _ in range(2))
        for _ in range(3):
            a @ b
        synchronize(args.device)
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 2.0:
            a @ b
            reps += 1
            if reps % 10 == 0:
                synchronize(args.device)
        synchronize(args.device)
        name = str(dtype).split(".")[-1]
        out[name] = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
        out[f"size_{name}"] = n
    return {"gflops_fp32": out["float32"], "gflops_bf16": out["bfloat16"],
            "size_fp32": out["size_float32"], "size_bf16": out["size_bfloat16"]}


def best_peak(peak: dict) -> tuple[float, str]:
    """The faster of the two measured matmul peaks and its name: bf16 where the hardware has bf16 matrix
    arithmetic, fp32 where bf16 is emulated. MFU is quoted against it, so a slow emulated bf16 cannot inflate it."""
    return max((peak["gflops_bf16"], "bf16"), (peak["gflops_fp32"], "fp32"))


def build(config: str, path: str, official: str | None, kernel: str | None = None):
    name, overrides, shape = CONFIGS[config]
    if path == "official":
        # Import the official package from the given checkout under another name (ours is also "vision_lstm").
        import importlib.util
        pkg = Path(official) / "vision_lstm"
        spec = importlib.util.spec_from_file_location("official_vision_lstm", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["official_vision_lstm"] = module
        spec.loader.exec_module(module)
        cfg = overrides
        model = module.VisionLSTM2(dim=cfg.get("dim", 192), depth=cfg.get("depth", 12), patch_size=cfg["patch_size"],
                                   input_shape=shape, output_shape=(cfg["num_classes"],), legacy_norm=True)
        return model, shape
    from vision_lstm import create_model
    model = create_model(name, **overrides)
    if path == "reference":
        model.use_reference_path()
    if path == "checkpointed":  # the fast path with gradient checkpointing (--grad-checkpointing in train.py)
        model.set_grad_checkpointing()
    if path == "kernels":  # the fast path with an mlstm_kernels kernel as the cell
        model.set_mlstm_mode(f"kernels:{kernel}")
    return model, shape


def model_flops(config: str) -> float:
    """Forward FLOPs per image of the true architecture (matmuls and convs, block-diagonal q/k/v at their real
    cost, full T x T products as the official count), from torch's FLOP counter on the reference path."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    model, shape = build(config, "reference", None)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *shape))
    return float(counter.get_total_flops())


def make_step(args):
    """The step ``worker_model`` times, for args (config, path, official, kernel, device, batch, precision, mode):
    a function running one training step (forward, backward, AdamW) or one inference forward on a fixed random
    batch. Also used by ab.py's step-interleaved comparison."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    device = args.device
    compiled = args.path in COMPILED_PATHS
    model, shape = build(args.config, COMPILED_PATHS.get(args.path, args.path), args.official, args.kernel)
    model = model.to(device)
    if compiled:
        # Compiled on the first (warm-up) step, whose time is reported separately: from an empty inductor cache,
        # as a new user's first run compiles (the default cache in /tmp would carry over from earlier runs).
        cache = tempfile.mkdtemp(prefix="vil-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        model = torch.compile(model)
    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if args.mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)
    return step


def worker_model(args) -> dict:
    import torch
    device = args.device
    step = make_step(args)
    rss_before = reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()  # the first warm-up step, timed on its own (it includes compilation on the compiled path)
    synchronize(device)
    first_step_s = time.perf_counter() - t
    for _ in range(args.warmup - 1):
        step()
    synchronize(device)
    times = []
    t_end = time.perf_counter() + args.seconds
    while len(times) < args.min_steps or time.perf_counter() < t_end:
        t = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t)
        if len(times) >= args.max_steps:
            break
    times.sort()
    median = times[len(times) // 2]
    import vision_lstm
    result = {"img_per_s": args.batch / median, "step_s": median, "best_step_s": times[0], "steps": len(times),
              "first_step_s": first_step_s, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
              "malloc_setting": vision_lstm.MALLOC_SETTING,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    # Our paths only: asking loads the kernels, which the official code's run never does. A revision from before
    # the tensor cache (benchmarks/ab.py runs this worker on old revisions' sources) has no such counter.
    from vision_lstm import fused
    ours = not args.path.startswith("official")
    cache_stats = getattr(fused, "tensor_cache_stats", lambda: None)() if ours else None
    result["tensor_cache"] = bool(cache_stats and cache_stats["installed"])
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def worker_seqlen(args) -> dict:
    import torch
    from vision_lstm.cell import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_step
    torch.manual_seed(0)
    B, H, T, DH = 1, 4, args.tokens, 96
    if args.form != "streaming":  # streaming makes its inputs token by token
        q, k, v = (torch.randn(B, H, T, DH) for _ in range(3))
        i, f = torch.randn(B, H, T), torch.randn(B, H, T) + 3

    def streaming():
        # Each step's inputs are made when needed and its output consumed, as in a stream; only the (C, n, m)
        # state lives across steps. Input generation is part of the time.
        state, checksum = None, 0.0
        for _ in range(T):
            qt, kt, vt = (torch.randn(B, H, DH) for _ in range(3))
            h, state = mlstm_step(qt, kt, vt, torch.randn(B, H), torch.randn(B, H) + 3, state)
            checksum += float(h[0, 0, 0])
        return checksum

    fn = {"parallel": lambda: mlstm_parallel(q, k, v, i, f),
          "chunkwise": lambda: mlstm_chunkwise(q, k, v, i, f, chunk_size=64),
          "recurrent": lambda: mlstm_recurrent(q, k, v, i, f),
          "streaming": streaming}[args.form]
    rss_before = reset_peak_rss()
    with torch.no_grad():
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {"time_ms": 1000 * min(times), "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


def run_worker(kind: str, threads: int, malloc: str = "kept", omp_wait: str = "default", **kw) -> dict:
    """Run one measurement in a fresh process. malloc: "kept" -- as importing vision_lstm sets glibc up (freed memory
    kept for reuse, src/vision_lstm/runtime.py); "default" -- glibc's defaults (VIL_MALLOC=default). omp_wait:
    "default" -- OpenMP's own wait policy; "active" -- OMP_WAIT_POLICY=ACTIVE (waiting threads spin instead of
    sleeping). Either way set here, not inherited from this process's environment."""
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads)]
    for key, value in kw.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("VIL_MALLOC", None)
    if malloc == "default":
        env["VIL_MALLOC"] = "default"
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(name, None)
    if omp_wait == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    p.add_argument("--paths", default="fast,reference",
                   help="fast,reference[,compiled][,checkpointed][,kernels][,official][,official-compiled] "
                        "(compiled: the fast path under torch.compile, from an empty inductor cache; checkpointed: "
                        "the fast path with gradient checkpointing; kernels: the fast path with the mlstm_kernels "
                        "kernel --kernel as the cell; official-compiled: the official code under torch.compile)")
    p.add_argument("--kernel", default="chunkwise--triton_xl_chunk",
                   help="the mlstm_kernels kernel of the kernels path (the Triton ones need a CUDA GPU)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models run")
    p.add_argument("--precisions", default="auto",
                   help="comma-separated fp32, bf16; default auto: both where the processor has bf16 matrix "
                        "arithmetic, else fp32 alone (emulated bf16 is many times slower)")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every (config, path, precision, mode) this many times, the rounds interleaved "
                        "(every other round in reverse order), and report the median round of each: on a shared "
                        "machine whose speed drifts, both sides of a ratio then see the same phases")
    p.add_argument("--official", default=None, help="path to a checkout of NX-AI/vision-lstm (adds 'official')")
    p.add_argument("--seqlens", default="64,256,1024,4096")
    p.add_argument("--skip-seqlen", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--output", default=str(REPO / "results" / "benchmarks"))
    p.add_argument("--tag", default="throughput")
    p.add_argument("--omp-wait", choices=("default", "both"), default="default",
                   help="OpenMP's wait policy for the model measurements: default (unset), or both: every "
                        "measurement also with OMP_WAIT_POLICY=ACTIVE (waiting threads spin instead of sleeping)")
    p.add_argument("--malloc", choices=("as-shipped", "both"), default="as-shipped",
                   help="as-shipped: each path as its users get it -- ours with the glibc setting that importing "
                        "vision_lstm applies (freed memory kept), the official code with glibc's defaults; both: "
                        "every path under both settings, side by side")
    # worker-only
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--form", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--min-steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=50, help=argparse.SUPPRESS)
    args = p.parse_args()
    load_recipe_configs()

    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        result = {"matmul": worker_matmul, "model": worker_model, "seqlen": worker_seqlen}[args.worker](args)
        print(json.dumps(result))
        return

    import torch
    if args.precisions == "auto":
        from vision_lstm.runtime import native_bf16
        args.precisions = "fp32,bf16" if native_bf16(args.device) else "fp32"
        print(f"precisions: {args.precisions} (auto)", flush=True)
    configs = [] if args.skip_models else (
        [resolve_config(c) for c in args.configs.split(",")] if args.configs else list(CONFIGS))
    paths = args.paths.split(",")
    valid = ("fast", "reference", "compiled", "checkpointed", "kernels", "official", "official-compiled")
    unknown = sorted(set(paths) - set(valid))
    if unknown:
        raise SystemExit(f"unknown path(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.official:
        paths = paths if "official" in paths else paths + ["official"]
    from vision_lstm.runtime import cpu_details, device_name
    report = {"machine": {"cpu": device_name("cpu"), "cpu_details": cpu_details(), "threads": args.threads,
                          "torch": torch.__version__, "python": platform.python_version()},
              "device": args.device if args.device == "cpu" else f"{args.device} ({device_name(args.device)})",
              "command": " ".join([Path(sys.executable).name] + sys.argv), "code": code_revision(),
              "batch": args.batch,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds}
    print(f"measuring matmul peak ({args.device}, {args.threads} threads) ...", flush=True)
    report["matmul_peak"] = run_worker("matmul", args.threads, device=args.device)
    peak_bf16 = report["matmul_peak"]["gflops_bf16"]
    peak_best, _ = best_peak(report["matmul_peak"])
    print(f"  fp32 {report['matmul_peak']['gflops_fp32']:.0f} GFLOP/s, bf16 {peak_bf16:.0f} GFLOP/s", flush=True)

    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    specs = []  # every measurement, in the order of a round
    for config in configs:  # (empty with --skip-models)
        flops = model_flops(config)
        for path in paths:
            if path.startswith("official") and (not args.official or not config.startswith("vil_tiny")):
                continue
            mallocs = ("kept", "default") if args.malloc == "both" else \
                ("default" if path.startswith("official") else "kept",)
            waits = ("default", "active") if args.omp_wait == "both" else ("default",)
            for precision, mode, malloc, wait in itertools.product(args.precisions.split(","),
                                                                   args.modes.split(","), mallocs, waits):
                specs.append({"config": config, "path": path, "precision": precision, "mode": mode,
                              "malloc": malloc, "omp_wait": wait, "fwd_gflop_per_img": flops / 1e9})
    measured = [[] for _ in specs]
    for round_ in range(args.rounds):
        order = range(len(specs)) if round_ % 2 == 0 else reversed(range(len(specs)))
        for n in order:
            spec = specs[n]
            r = run_worker("model", args.threads, malloc=spec["malloc"], omp_wait=spec["omp_wait"],
                           config=spec["config"], path=spec["path"],
                           precision=spec["precision"], mode=spec["mode"], batch=args.batch, seconds=args.seconds,
                           official=args.official, device=args.device,
                           kernel=args.kernel if spec["path"] == "kernels" else None)
            measured[n].append(r)
            print(f"  round {round_ + 1}/{args.rounds}: " + json.dumps({**spec, **r}), flush=True)
    rows = []
    for spec, results in zip(specs, measured):
        r = median_round(results)
        row = {**spec, **r}
        if args.rounds > 1:
            row["img_per_s_rounds"] = [x.get("img_per_s") for x in results]
        if spec["path"] == "kernels":
            row["kernel"] = args.kernel
        if "img_per_s" in r:
            gflops = (3 if spec["mode"] == "train" else 1) * spec["fwd_gflop_per_img"] * r["img_per_s"]
            row["mfu_bf16_peak"] = gflops / peak_bf16
            row["mfu"] = gflops / peak_best  # of the faster peak
        rows.append(row)
    report["models"] = rows

    seq_rows = []
    if not args.skip_seqlen:
        for tokens in map(int, args.seqlens.split(",")):
            for form in ("parallel", "chunkwise", "recurrent", "streaming"):
                r = run_worker("seqlen", args.threads, form=form, tokens=tokens)
                seq_rows.append({"tokens": tokens, "form": form, **r})
                print("  " + json.dumps(seq_rows[-1]), flush=True)
    report["seqlen"] = seq_rows

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.tag}.md").write_text(markdown(report))
    print(markdown(report))


def median_round(results: list[dict]) -> dict:
    """The round with the median img/s (the lower middle one for an even count); a failed round counts as slowest.
    One whole round, so its step time, memory and first step stay consistent with its img/s."""
    ranked = sorted(results, key=lambda r: r.get("img_per_s", -1.0))
    return ranked[(len(ranked) - 1) // 2]


def markdown(report: dict) -> str:
    peak = report["matmul_peak"]
    lines = [f"# Throughput ({report['date']})", "",
             f"Command: `{report['command']}`  ",
             f"Code: {report.get('code', 'not recorded')}  ", f"Machine: {report['machine']}  "]
    device = report.get("device", "cpu")  # "cpu", or e.g. "cuda (NVIDIA H200)"
    if device != "cpu":
        lines += [f"Device: {device}  "]
    if report["models"]:
        n = matmul_size(device.split(" ")[0])
        n32, n16 = peak.get("size_fp32", n), peak.get("size_bf16", n)
        sizes = f"{n32}x{n32} GEMM" if n32 == n16 else f"{n32}x{n32} and {n16}x{n16} GEMMs"
        memory = "the process's peak RSS" if device == "cpu" else "torch.cuda.max_memory_allocated"
        _, peak_name = best_peak(peak)
        lines += [f"Matmul peak: fp32 {peak['gflops_fp32']:.0f} GFLOP/s, bf16 {peak['gflops_bf16']:.0f} GFLOP/s "
                  f"({sizes}); MFU is of the faster, {peak_name}  ",
                  f"Batch {report['batch']}; img/s is the median step"
                  + (f" of the median of {report['rounds']} interleaved rounds (each round's in brackets)"
                     if report.get("rounds", 1) > 1 else "")
                  + f"; memory is {memory}; first step: the first "
                  f"warm-up step (on the compiled path it includes compilation; on the kernels path Triton's).", "",
                  ("malloc: `kept` is the glibc setting that importing vision_lstm applies (freed memory kept for "
                   "reuse); `default` is glibc's defaults (the official code as its users run it). OpenMP wait: "
                   "`default` is OpenMP's own policy, `active` is OMP_WAIT_POLICY=ACTIVE (waiting threads spin)."),
                  "",
                  "| config | path | precision | mode | malloc | OpenMP wait | GFLOP/img (fwd) | img/s "
                  f"| peak memory (MB) | MFU (of {peak_name} peak) | first step (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        head = (f"| {r['config']} | {r['path']} | {r['precision']} | {r['mode']} | {r.get('malloc', 'default')} "
                f"| {r.get('omp_wait', 'default')} | ")
        if "img_per_s" not in r:
            lines.append(f"{head} | error: {r.get('error', '?')} | | | |")
            continue
        memory = r.get("peak_cuda_mb", r["peak_rss_mb"])
        rounds = r.get("img_per_s_rounds")
        per_round = f" ({' / '.join('-' if x is None else f'{x:.1f}' for x in rounds)})" if rounds else ""
        lines.append(f"{head}{r['fwd_gflop_per_img']:.3f} | {r['img_per_s']:.1f}{per_round} | {memory:.0f} | "
                     f"{100 * r.get('mfu', r['mfu_bf16_peak']):.1f}% | {r.get('first_step_s', float('nan')):.1f} |")
    if report.get("seqlen"):
        lines += ["", "## Sequence length (one mLSTM layer's cell, B=1, 4 heads x 96, forward, no grad)", "",
                  "Memory is the peak RSS above the process's RSS once the inputs exist (so the output counts: 1.5 MB per",
                  "1024 tokens); `streaming` feeds `mlstm_step` one token at a time, making each token's inputs as it",
                  "goes and keeping no outputs.", "",
                  "| tokens | form | time (ms) | peak memory above the inputs (MB) |", "|---|---|---|---|"]
        for r in report["seqlen"]:
            if "time_ms" in r:
                lines.append(f"| {r['tokens']} | {r['form']} | {r['time_ms']:.1f} | "
                             f"{r['peak_rss_mb'] - r['rss_before_mb']:.1f} |")
            else:
                lines.append(f"| {r['tokens']} | {r['form']} | error: {r.get('error')} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
