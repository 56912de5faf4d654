"""The allocator set-up every command runs first (lmforge.runtime)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lmforge.runtime import tune_glibc_malloc

# A child process allocates one 16 MiB block and reports how many blocks glibc then holds
# as separate mappings (the change in mallinfo2().hblks): 1 with glibc's defaults, 0 once tuned.
CHILD = textwrap.dedent("""
    import ctypes, sys
    from lmforge.runtime import tune_glibc_malloc
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    tuned = tune_glibc_malloc() if sys.argv[1] == "tune" else False
    before = libc.mallinfo2().hblks
    block = libc.malloc(16 * 1024 * 1024)
    print(tuned, libc.mallinfo2().hblks - before)
""")


def _glibc() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _glibc(), reason="glibc's allocator is what is tuned; other C libraries are left alone")
def test_tuned_glibc_serves_large_blocks_from_the_heap() -> None:
    env = {"PATH": "", "LMFORGE_MALLOC_TUNE": "1"}
    runs = {mode: subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                                 env=env).stdout.split() for mode in ("plain", "tune")}
    assert runs["plain"] == ["False", "1"]  # glibc's default: a 16 MiB block is its own mapping
    assert runs["tune"] == ["True", "0"]  # tuned: it comes from the heap, and stays there when freed


def test_tuning_is_skipped_when_asked_or_under_tcmalloc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_MALLOC_TUNE", "0")
    assert tune_glibc_malloc() is False
    monkeypatch.setenv("LMFORGE_MALLOC_TUNE", "1")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")
    assert tune_glibc_malloc() is False
