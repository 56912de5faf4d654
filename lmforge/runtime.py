"""Process set-up for the command-line entry points: the memory allocator.

Training steps and batched inference allocate and free large activation, logit and
quantisation buffers. With glibc's defaults each large block goes back to the kernel when
freed and is faulted in again, page by page, when the next step asks for it.

- tcmalloc keeps them. Measured on the 2-core reference machine (docs/benchmarks.md):
  masked-LM training 4,869 -> 6,513 tokens/s, causal-LM 1,206 -> 1,850 tokens/s. So when
  the library is installed (Debian libtcmalloc-minimal4) the CLI re-executes itself with it
  preloaded; ``LMFORGE_TCMALLOC=0`` turns that off.
- Without it, glibc is told to keep them (``tune_glibc_malloc``): blocks up to 32 MiB come
  from the heap instead of fresh mappings, and freed heap stays mapped. Measured on an AMX
  Xeon (2 threads, runs alternating with and without): the batch-32 forward of a 4-layer
  encoder 110-125 -> 92-94 ms in fp32 and 56-70 -> 45-47 ms in dynamic int8; bf16 training
  within the noise (masked LM +2%, causal LM mixed, three pairs each; peak RSS +1-6%).
  ``LMFORGE_MALLOC_TUNE=0`` turns that off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

# tcmalloc_minimal first: the full library (heap profiler and checker built in) walks the
# stack with libunwind on sampled allocations, which made each dynamic-int8 product of a
# 40-token input 119 us against 36 us with tcmalloc_minimal and 44 us with glibc (AMX Xeon,
# 2 threads); training ran at the same speed with either.
TCMALLOC_PATHS = tuple(f"{folder}/{name}" for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
                       for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"))
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024


def under_tcmalloc() -> bool:
    """True when this process runs with tcmalloc preloaded."""
    return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def tcmalloc_path() -> str | None:
    return next((p for p in TCMALLOC_PATHS if Path(p).exists()), None)


def reexec_with_tcmalloc() -> None:
    """Restart this process with tcmalloc preloaded, once, if available and not disabled."""
    if os.environ.get("LMFORGE_TCMALLOC", "1") == "0" or under_tcmalloc():
        return
    library = tcmalloc_path()
    if library is None:
        return
    preload = ":".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "LD_PRELOAD": preload})


def tune_glibc_malloc() -> bool:
    """Keep large freed blocks in glibc's heap (see the module docstring); True when set.
    Nothing is done under tcmalloc, off Linux, on a C library without ``mallopt`` (musl),
    or with ``LMFORGE_MALLOC_TUNE=0``."""
    if os.environ.get("LMFORGE_MALLOC_TUNE", "1") == "0" or under_tcmalloc() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def prepare_process() -> str:
    """What a command does first: re-execute under tcmalloc where it is installed, else tune
    glibc's allocator. Returns the allocator this process runs with, for the record."""
    reexec_with_tcmalloc()
    if under_tcmalloc():
        return "tcmalloc"
    return "glibc (tuned)" if tune_glibc_malloc() else "system"
