"""Process-level memory settings, made for training and applied by the `lorakit` commands that run a model
(`lorakit train`, `demo`, `eval`, `generate`, `chat`, `serve`: cli/startup.py) and by the benchmarks' lorakit
training runs; `run_training` called from a user's program leaves the process alone (for a program of your own:
`env $(python -m lorakit.train.runtime) python train.py` starts it the same way).

**The malloc.** A training step allocates and frees hundreds of MB of activations and transients every step.
glibc's malloc lays them out in one heap that it never compacts: long-lived activations end up between freed
transients, and on SmolLM2 at 4 x 256 tokens the heap grows to twice what the step has in use at any moment
(~460 MB of resident free memory). tcmalloc groups blocks by size class: peak RSS ~380 MB lower, and faster.
Generation and serving gain as well: glibc maps a forward's large blocks afresh on every call (a bf16 forward of
8 x 128 tokens on SmolLM2 faults in ~30,000 pages) and tcmalloc serves the many small ones faster (the prompt's
forward ~15% faster, a decoding forward of the plain model ~8%, serving ~3%: docs/performance.md, optimisation 48).
A malloc can only be swapped when a process starts, so `use_preferred_allocator()` re-executes the `lorakit`
command once, before anything heavy is imported, with the library in LD_PRELOAD and told to keep freed memory
for reuse (TCMALLOC_RELEASE_RATE=0, as `tune_process` does for glibc). LORAKIT_ALLOCATOR chooses: `auto`
(default: tcmalloc when installed, else glibc), `system` (leave the process as it is), or the path of a malloc
library (preloaded as it is: its own environment variables configure it). jemalloc, measured too, is not chosen
automatically: with its default decay it returned a 16 x 256 step's large blocks to the kernel (0.6x the
speed), and with decay off it kept 2.5 GB for the demo's generation (docs/performance.md, optimisation 11).

**glibc, when it stays** (`tune_process`): its malloc serves every block above 128 kB-32 MB (an adaptive
threshold) with its own mmap and returns it to the kernel when freed, so each step faulted its activations back
in page by page: ~300,000 minor page faults per step, ~4% of its time. With mmap off for large blocks and no
trimming of the heap's top, freed blocks are reused and a step faults nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import sysconfig

ALLOCATOR_VARIABLE = "LORAKIT_ALLOCATOR"
# in order of preference: gperftools' tcmalloc ("minimal": without the heap profiler; Debian's
# libtcmalloc-minimal4, conda's gperftools)
PREFERRED_ALLOCATORS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_KNOWN_ALLOCATORS = ("libjemalloc", "libtcmalloc", "libmimalloc")
# Settings for the libraries lorakit chooses (the user's own values win). Freed memory kept for reuse instead of
# returned to the kernel, whose pages a step would otherwise fault back in: 4 x 256 tokens 1.73 -> 1.43 s a step,
# 16 x 256 6.6 -> 5.9 s, peak RSS unchanged. And no "large alloc" report on stderr for every block above 1 GiB
# (a big model's fp32 embedding is one).
_TCMALLOC_SETTINGS = {"TCMALLOC_RELEASE_RATE": "0", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2 ** 62)}
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_applied = False


class AllocatorChoiceError(ValueError):
    """LORAKIT_ALLOCATOR names no usable library."""


def active_allocator(environ=None) -> str | None:
    """The malloc library preloaded into this process (its file name), None for the C library's own."""
    environ = os.environ if environ is None else environ
    for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split():
        name = os.path.basename(entry)
        if name.startswith(_KNOWN_ALLOCATORS):
            return name
    return None


def allocator_name() -> str:
    """What serves malloc in this process, for logs: tcmalloc, jemalloc or mimalloc when one is preloaded and
    mapped, else the C library's (glibc on Linux)."""
    active = active_allocator()
    if active and _mapped(active):
        return library_label(active)
    return "glibc" if sys.platform.startswith("linux") else "system"


def library_label(library: str) -> str:
    """A malloc library's name for logs: libtcmalloc_minimal.so.4 -> tcmalloc."""
    return os.path.basename(library)[3:].split(".")[0].replace("_minimal", "")


def _mapped(library: str) -> bool:
    """Whether the library is loaded here (a symlink like libtcmalloc_minimal.so.4 maps as its target, .so.4.5.10)."""
    stem = library.split(".so")[0] + ".so"
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any(os.path.basename(line.rstrip()).startswith(stem) for line in maps)
    except OSError:
        return False


def find_allocator(environ=None) -> str | None:
    """The path of the malloc library to preload, as LORAKIT_ALLOCATOR says; None for the system's."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ALLOCATOR_VARIABLE, "auto").strip() or "auto"
    if choice == "system":
        return None
    if choice != "auto":
        if not os.path.isfile(choice):
            raise AllocatorChoiceError(
                f"{ALLOCATOR_VARIABLE}={choice}: no such file; set it to `auto` (tcmalloc when installed), "
                "`system` (the C library's malloc) or the path of a malloc library such as "
                "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
        return os.path.abspath(choice)
    for name in PREFERRED_ALLOCATORS:
        for directory in _library_directories(environ):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def _library_directories(environ) -> list[str]:
    """Where shared libraries are installed: this Python's environment (venv, conda) first, then the system's."""
    multiarch = sysconfig.get_config_var("MULTIARCH")  # e.g. x86_64-linux-gnu (Debian, Ubuntu)
    directories = []
    for prefix in (sys.prefix, environ.get("CONDA_PREFIX"), "/usr/local", "/usr", "/"):
        if prefix:
            directories += [os.path.join(prefix, "lib", multiarch)] if multiarch else []
            directories += [os.path.join(prefix, "lib64"), os.path.join(prefix, "lib")]
    return list(dict.fromkeys(directories))


def allocator_environment(environ=None) -> dict | None:
    """`environ` with the preferred malloc library added to LD_PRELOAD; None when there is nothing to change
    (not Linux, one already preloaded, LORAKIT_ALLOCATOR=system, or none installed)."""
    environ = dict(os.environ if environ is None else environ)
    if not sys.platform.startswith("linux") or active_allocator(environ):
        return None
    library = find_allocator(environ)
    if library is None:
        return None
    environ["LD_PRELOAD"] = " ".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    if os.path.basename(library) in PREFERRED_ALLOCATORS:
        for variable, value in _TCMALLOC_SETTINGS.items():
            environ.setdefault(variable, value)
    return environ


def use_preferred_allocator() -> None:
    """Re-execute this process with the preferred malloc preloaded (same PID, arguments and environment
    otherwise). Call only from a command's process before torch is imported; returns when nothing changes."""
    try:
        environ = allocator_environment()
    except AllocatorChoiceError as err:
        sys.stderr.write(f"lorakit: error: {err}\n")
        raise SystemExit(1) from None
    if environ is None:
        return
    argv = [sys.executable, *list(getattr(sys, "orig_argv", sys.argv))[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, environ)
    except OSError:  # the process goes on as it is, with the C library's malloc
        return


def tune_process() -> bool:
    """Keep freed memory in the process for reuse (glibc's malloc only; once per process). True when applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or allocator_name() != "glibc":  # another malloc is loaded
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 30))
    return _applied


def environment_assignments(environ=None) -> list[str]:
    """The `NAME=value` settings that start a process on the preferred malloc (none when nothing changes)."""
    environ = dict(os.environ if environ is None else environ)
    changed = allocator_environment(environ) or {}
    return [f"{name}={value}" for name, value in changed.items() if environ.get(name) != value]


if __name__ == "__main__":  # `env $(python -m lorakit.train.runtime) python train.py`
    try:
        print(" ".join(environment_assignments()))
    except AllocatorChoiceError as err:
        sys.exit(f"lorakit: error: {err}")
