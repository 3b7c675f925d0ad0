"""Process-level settings for training on a CPU, applied by `lorakit train` (cli/train.py: the process is the
trainer's own; `run_training` called from a user's program leaves the process alone) and by the benchmarks'
lorakit training runs.

glibc's malloc serves every block above 128 kB-32 MB (an adaptive threshold) with its own mmap and returns it to
the kernel when freed. A training step allocates and frees its activations (hundreds of MB) every step, so each
step faulted them back in page by page: ~300,000 minor page faults per SmolLM2 step at 4 x 256 tokens, ~4% of
its time (docs/performance.md). With mmap off for large blocks and no trimming of the heap's top, freed blocks are
reused and a step faults nothing; the peak RSS is unchanged. Other allocators (jemalloc, tcmalloc via
LD_PRELOAD) and other platforms are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_applied = False


def tune_process() -> bool:
    """Keep freed memory in the process for reuse (glibc only; once per process). True when applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 30))
    return _applied
