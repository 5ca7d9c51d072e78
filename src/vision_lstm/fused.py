"""CPU kernels of the package, compiled from ``csrc/`` at first use.

For the parallel mLSTM cell (``csrc/mlstm_cpu.cpp``): one kernel computes the whole forward (the scores, the weights
C = S D' and their row sums, C v and h) and one the whole backward (its four products and the passes between them,
slice by slice in cache): in bf16 on CPUs with AVX512-BF16 (AVX512-BF16 dot products, or AMX tiles through ATen's
brgemm where the CPU has them), and in fp32 on every CPU (fp32 multiply-adds that skip the causal mask's zeros).
Elsewhere (bf16 without AVX512-BF16, float64) the cell's products run in PyTorch, and the elementwise passes between
them (and the matching backward passes) run as one C++ pass each instead of about ten PyTorch passes over
(B, H, T, T) memory. For the ViL layer (``csrc/blockdiag_cpu.cpp``): the block-diagonal
q, k, v projections and their gradients, one pass each, in the layouts the cell wants; (``csrc/layer_cpu.cpp``) the
depthwise convolution with its SiLU, the output path (per-head norm, skip, output gate), the block's input norm and
the reversed block's residual sum, one pass each forward and backward. With them loads a caching allocator for CPU
tensors (``csrc/alloc_cpu.cpp``: freed blocks of 64 KB to 32 MB reused by size instead of going back through malloc),
unless the user opted out of the package's malloc settings (``runtime.tensor_cache_wanted``).

The sources are compiled once per machine with the system's C++ compiler (``torch.utils.cpp_extension``, for this
CPU: ``-march=native``) and cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); the first build takes 20-60 s on 2 cores (22 s measured on the Intel host of
session 20).

Where no compiler is found or the build fails, the cell and the layer warn once and keep their PyTorch forms (same
math; slower). ``VIL_FUSED=0`` turns the kernels off without trying to build them.
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

from . import runtime

_CSRC = Path(__file__).with_name("csrc")
# compiled; the kernels include vec.h (and blockdiag.h, headnorm.h)
_SOURCES = ("mlstm_cpu.cpp", "blockdiag_cpu.cpp", "layer_cpu.cpp", "alloc_cpu.cpp")
_FILES = (*_SOURCES, "vec.h", "blockdiag.h", "headnorm.h")
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
    sources = [(_CSRC / name).read_bytes().decode() for name in _FILES]
    for part in (*info, torch.__version__, sys.version, *sources, " ".join(_FLAGS)):
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
            print(f"vision_lstm: compiling the CPU kernels once for this machine (20-60 s; "
                  f"cached in {build_dir}; VIL_FUSED=0 skips them)", file=sys.stderr, flush=True)
        # Build from a copy of the sources inside the build folder: ninja rebuilds whenever a source's path in its
        # build file changes, so two checkouts of the same source (or benchmarks/ab.py's exported revision) would
        # otherwise recompile each other's build, 20 s every time one of them is imported (measured in session 22).
        for file in _FILES:
            source, copy = _CSRC / file, build_dir / file
            if not copy.is_file() or copy.read_bytes() != source.read_bytes():
                partial = copy.with_name(f"{file}.{os.getpid()}.tmp")
                partial.write_bytes(source.read_bytes())
                os.replace(partial, copy)  # atomic: a process building at the same time never reads half a file
        cpp_extension.load(name=name, sources=[str(build_dir / file) for file in _SOURCES], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        kernels = torch.ops.vision_lstm_cpu
        if runtime.tensor_cache_wanted():
            kernels.install_tensor_cache(runtime.MMAP_THRESHOLD)  # larger blocks: malloc maps and unmaps them
        return kernels
    except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch form still works
        return error


def ops():
    """The kernels' operators (``torch.ops.vision_lstm_cpu``), or None (disabled or unavailable)."""
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
def vector_lanes() -> int:
    """The fp32 lanes of the kernels' vectors, 0 without the kernels: 16 on CPUs with AVX-512, else 8 (AVX2). The
    block-diagonal kernels take blocks of up to this many channels (whole blocks per vector)."""
    kernels = ops()
    return 0 if kernels is None else int(kernels.vector_lanes())


@functools.lru_cache(maxsize=None)
def _warn_unavailable(reason: str) -> None:
    warnings.warn(f"the fused mLSTM CPU kernels could not be built ({reason}); the cell uses its PyTorch form, "
                  f"which gives the same results more slowly. They need a C++ compiler (g++) and ninja "
                  f"(pip install ninja); set VIL_FUSED=0 to silence this.", RuntimeWarning, stacklevel=3)


def tensor_cache_stats() -> dict | None:
    """The CPU tensor cache's counters (``csrc/alloc_cpu.cpp``), or None without the kernels: whether it is PyTorch's
    CPU allocator, the bytes in use, their peak and the bytes cached (of the blocks it keeps: 64 KB to 32 MB), and
    how many of their requests the cache served (hits) or passed to malloc (misses)."""
    kernels = ops()
    if kernels is None:
        return None
    installed, in_use, peak, cached, hits, misses = kernels.tensor_cache_stats()
    return {"installed": bool(installed), "in_use": in_use, "peak_in_use": peak, "cached": cached, "hits": hits,
            "misses": misses}


def release_tensor_cache() -> int:
    """Hands the CPU tensor cache's blocks back to malloc (as ``torch.cuda.empty_cache`` does on the GPU); returns
    the bytes released (0 without the kernels). The cache refills as tensors are freed again."""
    kernels = ops()
    return 0 if kernels is None else int(kernels.release_tensor_cache())
