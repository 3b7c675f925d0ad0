"""Build and load lorakit's C++ CPU kernels (ops/csrc/*.cpp) on first use.

    load_cpu_extension("lorakit_cpu")   # -> torch.ops.lorakit.* registered; raises KernelBuildError
    kernels_available()                 # the same for callers with a fallback: False (one warning) on failure

Each source is compiled once per machine with the system's C++ compiler (`$CXX`, else `c++` / `g++`) against the
installed torch (its headers, libtorch_cpu, its OpenMP), with `-O3 -march=native -fopenmp`, into
`<cache root>/kernels/<name>-<key>.so` ($LORAKIT_CACHE, else ~/.cache/lorakit). The key hashes what the binary
depends on (the source, the torch version and C++ ABI, the compiler's version, the flags and this CPU's model and
instruction sets), so a new torch, a changed kernel or another machine sharing the cache builds its own copy.
The build writes to a temporary file and renames it into place: concurrent processes (torchrun's ranks) never
load a half-written library, and a failed build leaves nothing behind. No ninja and no Python build step: one
compiler call.

Callers fall back to PyTorch's kernels when this raises (no compiler, no Python headers needed: only torch's):
`kernels_available` does that bookkeeping, with one warning per process. lorakit's kernels (causal_attention.cpp,
rms_norm.cpp, cross_entropy.cpp, dora_scale.cpp, rotary.cpp, swiglu.cpp, lora_rows.cpp, linear_rows.cpp,
lora_linear_rows.cpp)
build as one library from lorakit_cpu.cpp, which includes them: one compiler call parses torch's headers once
(~13 s, against ~12 s per kernel built on its own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lorakit.models.embedded import cache_root

CSRC = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 600
_LOADED: dict[str, Path] = {}
KERNELS = "lorakit_cpu"  # ops/csrc/lorakit_cpu.cpp: every kernel, one library
_FAILED: dict[str, str] = {}  # name -> why it could not be built or loaded in this process
logger = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
    """A kernel could not be compiled or loaded here; the message says why (the caller falls back)."""


def load_cpu_extension(name: str) -> Path:
    """Compile (if not cached) and load ops/csrc/<name>.cpp into this process, once. Returns the library path."""
    if name in _LOADED:
        return _LOADED[name]
    source = CSRC / f"{name}.cpp"
    compiler = find_compiler()
    command_tail = _compile_arguments()
    key = _build_key(_sources(source), compiler, command_tail)
    library = cache_root() / "kernels" / f"{name}-{key}.so"
    if not library.exists():
        print(f"lorakit: compiling {source.name} for this machine (once, ~15 s) into {library.parent}", file=sys.stderr)
        _build(source, library, compiler, command_tail)
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as error:
        raise KernelBuildError(f"could not load {library}: {error}") from error
    _LOADED[name] = library
    return library


def kernels_available() -> bool:
    """Build / load lorakit's CPU kernels (ops/csrc/lorakit_cpu.cpp) once per process; where they cannot be, False
    and one warning, and False again without retrying."""
    if _FAILED:
        return False
    try:
        load_cpu_extension(KERNELS)
    except KernelBuildError as error:
        _FAILED[KERNELS] = str(error)
        logger.warning("lorakit's CPU kernels are not available; attention stays on PyTorch's SDPA and RMSNorm, "
                       "the rotary embedding, the LM head's loss, DoRA's scaling and a decoded token's LoRA and dense "
                       "products on PyTorch's operators (slower; the results equal to rounding): %s", error)
        return False
    return True


def kernel_runs_for(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> bool:
    """Whether lorakit's CPU kernels compute for these tensors: every one a contiguous CPU tensor, all of one dtype
    among `dtypes` (bf16 alone by default: most kernels are bf16 ones), and the kernels built (see
    `kernels_available`)."""
    return (bool(tensors) and tensors[0].dtype in dtypes
            and all(t.dtype == tensors[0].dtype and t.is_cpu and t.is_contiguous() for t in tensors)
            and kernels_available())


def find_compiler() -> str:
    """`$CXX` if set, else the first of c++ / g++ / clang++ on PATH."""
    configured = os.environ.get("CXX", "").strip()
    candidates = [configured] if configured else ["c++", "g++", "clang++"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise KernelBuildError(f"no C++ compiler found ({'$CXX=' + configured if configured else 'c++, g++, clang++'}); "
                           "install one (Debian: apt-get install g++) to build lorakit's CPU kernels")


def _compile_arguments() -> list[str]:
    root = os.path.dirname(torch.__file__)
    torch_lib = os.path.join(root, "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [*FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{os.path.join(root, 'include')}", f"-L{torch_lib}",
            "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"]


def _sources(source: Path) -> bytes:
    """The source and every other C++ file and header beside it (a source may include them): what the library is
    built from."""
    others = sorted(p for p in (*source.parent.glob("*.cpp"), *source.parent.glob("*.h")) if p != source)
    return b"\0".join(p.read_bytes() for p in (source, *others))


def _build_key(source: bytes, compiler: str, arguments: list[str]) -> str:
    digest = hashlib.sha256(source)
    for part in (torch.__version__, compiler, _compiler_version(compiler), " ".join(arguments), _cpu_identity()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise KernelBuildError(f"the C++ compiler {compiler} does not run: {error}") from error


def _cpu_identity() -> str:
    """The CPU model and instruction-set flags (-march=native code is only valid on CPUs that have them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(wanted)))


def _build(source: Path, library: Path, compiler: str, arguments: list[str]) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{library.stem}-", suffix=".so", dir=library.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, str(source), "-o", temporary, *arguments], capture_output=True, text=True,
                                check=False, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise KernelBuildError(f"{compiler} could not build {source.name}: " + " | ".join(errors[-3:])[-600:])
        os.chmod(temporary, 0o755)  # mkstemp made it owner-only; a cache shared via $LORAKIT_CACHE needs more
        os.replace(temporary, library)
    except subprocess.TimeoutExpired as error:
        raise KernelBuildError(f"building {source.name} took over {BUILD_TIMEOUT_S} s") from error
    except OSError as error:
        raise KernelBuildError(f"could not build {source.name} into {library.parent}: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
