"""Give back the memory of weights read from a memory-mapped checkpoint once they have been converted.

transformers loads a safetensors checkpoint by mapping the file into memory: a weight in the file's dtype is a
view of the mapping, and each page of it counts in the process's resident memory from its first read until the
whole mapping goes, when the last weight viewing it is freed. A run that converts every weight (fp32 -> bf16 for a
bf16 training run, precision.py; fp32 -> NF4 for QLoRA, methods/quant) reads the whole file while it builds the
converted copies, so the process held the file's size plus the copies: for a 360M-parameter fp32 checkpoint
1.45 GB + 0.72 GB, above what its training step then needs (docs/performance.md, optimisation 40).

    mappings = FileMappings.read()          # once, before converting
    release_file_pages(old_weight, mappings) # after each conversion, when old_weight is no longer used

`release_file_pages` asks the kernel to reclaim the pages that lie wholly inside the tensor's bytes and inside a
private mapping of a regular file (madvise MADV_PAGEOUT, Linux >= 5.4). That never changes a value: a clean page
is dropped and a later read maps it from the file again, with the same bytes; a page the process wrote is kept
(or swapped out, where there is swap). Elsewhere (no /proc/self/maps, an older kernel, a tensor in ordinary
memory or on a GPU) it does nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from dataclasses import dataclass, field

import torch

MADV_PAGEOUT = 21  # linux/mman.h; Python's mmap module does not name it
_PROC_MAPS = "/proc/self/maps"


def _madvise():
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


@dataclass
class FileMappings:
    """The address ranges of this process's private mappings of regular files (sorted, non-overlapping)."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @classmethod
    def read(cls, path: str = _PROC_MAPS) -> "FileMappings":
        """From /proc/self/maps ("start-end perms offset dev inode path"); empty where there is none."""
        mappings = cls()
        try:
            with open(path, encoding="utf-8", errors="replace") as maps:
                lines = maps.readlines()
        except OSError:
            return mappings
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or len(fields[1]) < 4 or fields[1][3] != "p" or fields[4] == "0":
                continue
            path_name = fields[5].strip()
            if not path_name.startswith("/") or path_name.startswith(("/dev/", "/memfd:")):
                continue
            start, end = (int(value, 16) for value in fields[0].split("-"))
            if mappings.ends and mappings.ends[-1] == start:  # one file's mapping, listed in parts
                mappings.ends[-1] = end
            else:
                mappings.starts.append(start)
                mappings.ends.append(end)
        return mappings

    def covers(self, start: int, end: int) -> bool:
        """True when [start, end) lies inside one of the mappings."""
        index = bisect.bisect_right(self.starts, start) - 1
        return index >= 0 and end <= self.ends[index]

    def holds(self, tensor: torch.Tensor) -> bool:
        """True when a contiguous CPU tensor's bytes lie inside one of the mappings (a view of a mapped file)."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return False
        start = tensor.data_ptr()
        return self.covers(start, start + tensor.numel() * tensor.element_size())


@torch.no_grad()
def cast_in_place(param: torch.Tensor, dtype: torch.dtype, mappings: FileMappings) -> None:
    """param.data cast to `dtype`, and the old data's pages of a mapped file given back (release_file_pages)."""
    old = param.data
    param.data = old.to(dtype)
    release_file_pages(old, mappings)


def release_file_pages(tensor: torch.Tensor, mappings: FileMappings) -> int:
    """Reclaim the whole pages of `tensor`'s bytes that lie in a private file mapping (see the module docstring);
    call it once nothing needs the tensor's values in memory. Returns the bytes advised (0 when nothing applied)."""
    if _MADVISE is None or not mappings.starts or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # the pages wholly inside the tensor
    if last <= first or not mappings.covers(first, last):
        return 0
    if _MADVISE(first, last - first, MADV_PAGEOUT) != 0:
        return 0  # an older kernel (EINVAL), or a range the kernel refuses: the pages simply stay
    return last - first
