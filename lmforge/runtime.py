"""Process set-up for the command-line entry points.

tcmalloc: training steps allocate and free large activation and logit buffers; with
glibc's allocator each large block goes back to the kernel and is faulted in again.
Measured on the 2-core reference machine (docs/benchmarks.md): masked-LM training
4,869 -> 6,513 tokens/s, causal-LM 1,206 -> 1,850 tokens/s. So when the library is
installed (Debian libgoogle-perftools4) the CLI re-executes itself with it preloaded;
LMFORGE_TCMALLOC=0 turns that off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc.so.4",
    "/usr/lib/libtcmalloc.so.4",
)


def tcmalloc_path() -> str | None:
    return next((p for p in TCMALLOC_PATHS if Path(p).exists()), None)


def reexec_with_tcmalloc() -> None:
    """Restart this process with tcmalloc preloaded, once, if available and not disabled."""
    if os.environ.get("LMFORGE_TCMALLOC", "1") == "0" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    library = tcmalloc_path()
    if library is None:
        return
    preload = ":".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "LD_PRELOAD": preload})
