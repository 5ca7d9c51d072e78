"""Fused CPU kernels for the parallel mLSTM cell, compiled from ``csrc/mlstm_cpu.cpp`` at first use.

The cell's matrix products run in PyTorch, except the bf16 scores q k^T, which one kernel computes together with
the weights C = S D' and their row sums (AVX512-BF16 dot products, or AMX tiles through ATen's brgemm where the CPU
has them); the other elementwise passes between the products (and the matching backward passes) run as one C++
pass each instead of about ten PyTorch passes over (B, H, T, T) memory. The source is compiled once per machine
with the system's C++ compiler (``torch.utils.cpp_extension``, for this CPU: ``-march=native``) and cached in
torch's extension folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); the first build takes 20-60 s on 2 cores
(22 s measured on the Intel host of session 20).

Where no compiler is found or the build fails, the cell warns once and keeps its PyTorch form (same math; slower).
``VIL_FUSED=0`` turns the kernels off without trying to build them.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "mlstm_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


def enabled() -> bool:
    """Whether the cell may use the fused kernels (``VIL_FUSED`` is not set to 0, false, no or off)."""
    return os.environ.get("VIL_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    """What the native build depends on: CPU model and flags, torch version, source, flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        info = [platform.processor()]
    digest = hashlib.sha256()
    for part in (*info, torch.__version__, sys.version, _SOURCE.read_bytes().decode(), " ".join(_FLAGS)):
        digest.update(part.encode())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _build():
    """Compile (or load the cached build of) the extension; returns its operator namespace or the error."""
    try:
        from torch.utils import cpp_extension

        name = f"vision_lstm_cpu_{_cpu_signature()}"
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print(f"vision_lstm: compiling the fused mLSTM CPU kernels once for this machine (20-60 s; "
                  f"cached in {build_dir}; VIL_FUSED=0 skips them)", file=sys.stderr, flush=True)
        # Build from a copy of the source inside the build folder: ninja rebuilds whenever the source's path in its
        # build file changes, so two checkouts of the same source (or benchmarks/ab.py's exported revision) would
        # otherwise recompile each other's build, 20 s every time one of them is imported (measured in session 22).
        source = build_dir / _SOURCE.name
        if not source.is_file() or source.read_bytes() != _SOURCE.read_bytes():
            partial = source.with_name(f"{source.name}.{os.getpid()}.tmp")
            partial.write_bytes(_SOURCE.read_bytes())
            os.replace(partial, source)  # atomic: a process building at the same time never reads half a file
        cpp_extension.load(name=name, sources=[str(source)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        return torch.ops.vision_lstm_cpu
    except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch form still works
        return error


def ops():
    """The fused operators (``weights_forward``, ``weights_backward``), or None (disabled or unavailable)."""
    if not enabled():
        return None
    built = _build()
    if isinstance(built, Exception):
        _warn_unavailable(repr(built).splitlines()[0][:500])
        return None
    return built


@functools.lru_cache(maxsize=None)
def has_bf16_scores() -> bool:
    """Whether the build has the bf16 kernels of the cell's forward (the whole forward ``forward_bf16`` and its scores
    part ``weights_forward_qk``): CPUs with AVX512-BF16 (Intel from Cooper Lake and Sapphire Rapids, AMD from Zen 4).
    Elsewhere the cell computes its products with PyTorch. On CPUs with AMX tiles (Intel from Sapphire Rapids) the
    kernels' products run on them (``has_tile_scores``), elsewhere as AVX512-BF16 dot products."""
    kernels = ops()
    return kernels is not None and bool(kernels.has_bf16_scores())


@functools.lru_cache(maxsize=None)
def has_tile_scores() -> bool:
    """Whether the kernels run their bf16 products on AMX tiles (Intel from Sapphire Rapids, through ATen's brgemm
    micro-kernel) rather than as AVX512-BF16 dot products."""
    kernels = ops()
    return kernels is not None and bool(kernels.has_tile_scores())


@functools.lru_cache(maxsize=None)
def _warn_unavailable(reason: str) -> None:
    warnings.warn(f"the fused mLSTM CPU kernels could not be built ({reason}); the cell uses its PyTorch form, "
                  f"which gives the same results more slowly. They need a C++ compiler (g++) and ninja "
                  f"(pip install ninja); set VIL_FUSED=0 to silence this.", RuntimeWarning, stacklevel=3)
