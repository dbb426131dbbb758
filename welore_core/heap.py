"""The C heap of a process doing long model work (Linux, glibc).

glibc's malloc serves a large block with mmap and, each time such a block is freed, raises its
mmap threshold to that block's size (up to 32 MiB on 64-bit). After a few layers, blocks of a
layer's size come from the heap instead, where freed memory is rarely given back: peak RSS then
grows with the number of layers processed and differs from run to run. Measured (bench.scale's
32-layer synthetic model, streamed data-free compression, three identical runs): 873 / 1,165 /
1,181 MB by default, 823 / 822 / 823 MB with the threshold fixed. Setting it (and the trim
threshold) explicitly turns the adjustment off; large tensors then always come from mmap and go
back to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 1 << 20  # 1 MiB: a tensor this large or larger is mmap'd and unmapped when freed


def fix_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to fix
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD) == 1
