"""Process-level settings for fast CPU execution: how glibc's malloc returns freed memory to the OS, and which
precision runs fast on this processor.

PyTorch frees and re-allocates many tensors of a few to a few tens of MB on every step. By default glibc hands the
top of its heap back to the OS as soon as more than a few MB are free there (and maps some large blocks
separately), so the next step's tensors are paged in again: one page fault and a page of zeros per 4 KB. Keeping
freed memory in the process makes inference up to about 2x faster on 2 cores and training a few % faster (measured
side by side in results/benchmarks/allocator.md). The cost: the process keeps its peak heap until it exits, as
PyTorch's own GPU allocator does.

Applied once when ``vision_lstm`` is imported, so a plain PyTorch loop around ``create_model`` gets it too. It is
left alone when the user has tuned malloc through glibc's environment variables, when ``VIL_MALLOC=default`` is
set, and on systems without glibc.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import time
from pathlib import Path

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks above this still get their own mapping (and go back to the OS when freed): one-off buffers such as a
# decoded dataset. 32 MB is glibc's own upper bound for its adaptive threshold.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the top of the heap is kept up to this much (the largest value mallopt accepts).
TRIM_THRESHOLD = 2**31 - 1
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> str:
    """Tell glibc malloc to keep freed memory for reuse. Returns what was done, for logs: 'on', or why not."""
    if os.environ.get("VIL_MALLOC", "").lower() == "default":
        return "off (VIL_MALLOC=default)"
    user = [name for name in _USER_SETTINGS if name in os.environ]
    if user:
        return f"off (left to {', '.join(user)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "off (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return "off (mallopt not available)"
    return "on" if ok else "off (mallopt refused)"


MALLOC_SETTING = keep_freed_memory()


def tensor_cache_wanted() -> bool:
    """Whether the kernels (``vision_lstm.fused``) install their caching allocator for CPU tensors when they load
    (``csrc/alloc_cpu.cpp``): where the malloc setting above was applied, so that ``VIL_MALLOC=default`` and glibc's
    own environment variables opt out of both."""
    return MALLOC_SETTING == "on"


def device_name(device: str = "cpu") -> str:
    """The processor's model name, for logs and benchmark reports: speed figures compare only on the same chip, and
    a run resumed on another machine should say so."""
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_details() -> dict:
    """What sets a CPU's speed beyond its name, for benchmark reports: family and model numbers, per-core L1d and
    L2 sizes, and the vector and matrix extensions the kernels use (Linux; empty elsewhere). Virtual machines often
    name their processor only by its brand ("AMD EPYC"), and two hosts of that name had bf16 matmul peaks 1.8x apart
    (sessions 19 and 23: 405 and 730 GFLOP/s on 2 cores)."""
    details: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return details
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("cpu family", "model", "stepping") and key not in details:
            details[key.replace(" ", "_")] = value
        elif key in ("flags", "Features"):
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16", "sve")
            details["extensions"] = [flag for flag in wanted if flag in value.split()]
            break
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind in ("Data", "Unified"):
            details[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return details

# CPU flags (Linux /proc/cpuinfo) of native bf16 matrix arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16 extension.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
PRECISIONS = ("auto", "fp32", "bf16")


def bf16_in_cpuinfo(cpuinfo: str) -> bool | None:
    """Whether a /proc/cpuinfo text lists native bf16 matrix arithmetic; None when it has no flags line."""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86 and Arm name the line differently; the first is enough
            return bool(_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return None


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matrix products run in hardware on ``device``. Without AVX512-BF16 or AMX (x86) or BF16 (Arm),
    PyTorch emulates them on the CPU: measured 1.2 vs 94 GFLOP/s for fp32 on a 2-core AVX2 AMD EPYC
    (results/benchmarks/session22-avx2), so bf16 autocast there makes training many times slower, not faster."""
    import torch
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        listed = bf16_in_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        listed = None
    if listed is not None:
        return listed
    try:  # not Linux: oneDNN's own check of the instruction set
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# bf16 autocast pays only where bf16 matrix products run well ahead of fp32 ones: it adds casts, and the model's
# other passes gain less. Measured on ViL-T (2 cores): with bf16 products 2.7x the fp32 ones (AMD Zen 4) bf16 trained
# 1.9x and inferred 2.2x as fast as fp32 (results/benchmarks/session26-zen4-rounds); at 0.57x (an Intel Xeon with
# AVX512-BF16 but no AMX exposed: 198 against 345 GFLOP/s) it trained 0.75x and inferred 0.69x as fast
# (results/benchmarks/session36-intel-avx512bf16-start). So "auto" picks bf16 from 1.5x on.
BF16_MIN_SPEEDUP = 1.5


@functools.lru_cache(maxsize=None)
def matmul_rates(size: int = 1024, repeats: int = 3) -> tuple[float, float]:
    """This CPU's (fp32, bf16) GFLOP/s on a size x size matrix product, best of ``repeats`` after a warm-up, with
    PyTorch's current threads: about 0.1 s, once a process. Call it only where bf16 is native (:func:`native_bf16`):
    emulated bf16 products take seconds."""
    import torch
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        rates.append(2 * size ** 3 / best / 1e9)
    return rates[0], rates[1]


def resolve_precision(precision: str, device: str = "cpu") -> tuple[str, str]:
    """The precision to run in ("fp32" or "bf16") for a requested one ("auto", "fp32" or "bf16"), and a note for
    the log ("" when there is nothing to say). "auto" is bf16 autocast where the hardware has bf16 matrix
    arithmetic and, on a CPU, its bf16 products measure at least BF16_MIN_SPEEDUP times as fast as fp32 ones
    (:func:`matmul_rates`; weights, optimiser and EMA stay fp32 either way), else fp32; an explicit "bf16" is kept
    but warned about where it is emulated."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = native_bf16(device)
    if precision == "auto":
        if not native:
            return "fp32", ("precision auto: fp32 (this processor has no bf16 matrix arithmetic - AVX512-BF16 or "
                            "AMX - so bf16 autocast would be emulated and far slower)")
        if str(device).startswith("cuda"):
            return "bf16", "precision auto: bf16 autocast (this GPU has bf16 matrix arithmetic)"
        fp32, bf16 = matmul_rates()
        measured = f"bf16 matrix products measured {bf16:.0f} against {fp32:.0f} GFLOP/s in fp32 on this processor"
        if bf16 < BF16_MIN_SPEEDUP * fp32:
            return "fp32", (f"precision auto: fp32 ({measured}: bf16 autocast pays from {BF16_MIN_SPEEDUP}x on; "
                            "--precision bf16 forces it)")
        return "bf16", f"precision auto: bf16 autocast ({measured})"
    if precision == "bf16" and not native:
        return "bf16", ("warning: bf16 was asked for, but this processor has no bf16 matrix arithmetic (AVX512-BF16 "
                        "or AMX): PyTorch emulates it and training runs many times slower than in fp32. "
                        "Use --precision auto or fp32")
    return precision, ""
