"""Process-level settings for fast CPU execution: how glibc's malloc returns freed memory to the OS.

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
import os
import platform
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
