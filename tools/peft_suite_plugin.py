"""pytest plugin loaded into HuggingFace PEFT's own test suite by tools/peft_suite.py (never imported by lorakit).

It does three things, steered by environment variables the driver sets:

- PEFT_SUITE_MODE=lorakit: before any test module is imported, every name that lorakit exports (`lorakit.__all__`)
  and that the `peft` package also exports is replaced on `peft` by lorakit's object, so `from peft import
  LoraConfig, get_peft_model, PeftModel, ...` in the tests gives lorakit's. Imports of PEFT's internals
  (`from peft.tuners.lora import LoraLayer`) stay PEFT's. PEFT_SUITE_MODE=peft changes nothing (the baseline).
- selection: only the plain-LoRA tests are kept (`plain_lora_reason`; the definition is documented in
  docs/peft-compatibility.md), further restricted to the node ids listed in PEFT_SUITE_ONLY (a JSON list) and
  minus those in PEFT_SUITE_SKIP. The kept ids are written to PEFT_SUITE_SELECTED (JSON).
- results: one JSON line per test in PEFT_SUITE_OUT: node id, outcome (passed / failed / skipped), the
  failure's one-line message, exception location and duration.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import types

import pytest

# LoraConfig fields of PEFT whose feature lorakit does not implement, with PEFT's default (neutral) value. A test
# whose config sets one of them to another value is not a plain-LoRA test.
UNIMPLEMENTED_LORA_FIELDS = {
    "megatron_config": None, "trainable_token_indices": None, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "monteclora_config": None, "layer_replication": None, "lora_bias": False,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}
# init_lora_weights values of PEFT that lorakit does not implement
UNIMPLEMENTED_INITS = ("eva", "corda", "loftq", "orthogonal", "mica", "lora_ga")
# In a test's source (for tests not parametrized by config): words naming those features.
FEATURE_WORDS = re.compile(
    r"\b(?:" + "|".join(sorted(UNIMPLEMENTED_LORA_FIELDS)) + r"|ephemeral_gpu_offload|runtime_config)\b"
    r"|(?i:(?<![a-z0-9])(?:loftq|corda|eva(?=_|config)|bd_?lora|kasa|velora|monteclora|arrow|megatron|alora"
    r"|lora_?ga(?![a-z])))"
    r"|[\"'](?:" + "|".join(UNIMPLEMENTED_INITS) + r")[\"']")
# Config class names that are LoRA's (and the base class every method shares).
LORA_CONFIG_NAMES = {"LoraConfig", "PeftConfig"}
# Model classes lorakit does not have (PEFT's mixed-method model), found in a test's source.
OTHER_MODEL_WORDS = re.compile(r"\b(?:PeftMixedModel|mixed=True|XLora\w*)\b")


def _peft_config_names() -> set[str]:
    """Every adapter config class name PEFT exports (LoraConfig, VeraConfig, LoftQConfig, ...)."""
    import peft

    names = {n for n in dir(peft) if n.endswith("Config") and isinstance(getattr(peft, n), type)}
    return names | {"BdLoraConfig"}


PEFT_CONFIG_NAMES: set[str] = set()


# ---- the swap ---------------------------------------------------------------------------------------------------
def swap_peft_names(tests_dir: str | None = None) -> list[str]:
    """Replace on the `peft` package every name lorakit also exports; returns the names swapped. Names the tests
    import from a PEFT submodule (`from peft.utils.hotswap import hotswap_adapter`) are swapped there too, in
    exactly the modules the tests import them from (PEFT's other modules keep PEFT's objects)."""
    import importlib

    import lorakit
    import peft

    swapped = []
    for name in sorted(lorakit.__all__):
        if hasattr(peft, name) and not isinstance(getattr(lorakit, name), types.ModuleType):
            setattr(peft, name, getattr(lorakit, name))
            swapped.append(name)
    for module_name, names in sorted(submodule_imports(tests_dir).items()):
        module = importlib.import_module(module_name)
        for name in sorted(names):
            if name in lorakit.__all__ and hasattr(module, name):
                setattr(module, name, getattr(lorakit, name))
                swapped.append(f"{module_name}.{name}")
    return swapped


IMPORT_FROM = re.compile(r"^\s*from\s+(peft(?:\.\w+)+)\s+import\s+(\([^)]*\)|[^\n]*)", re.MULTILINE)


def submodule_imports(tests_dir: str | None) -> dict[str, set[str]]:
    """{PEFT submodule: names} of every `from peft.<submodule> import <names>` in the test files."""
    found: dict[str, set[str]] = {}
    if not tests_dir or not os.path.isdir(tests_dir):
        return found
    for file_name in sorted(os.listdir(tests_dir)):
        if not file_name.endswith(".py"):
            continue
        with open(os.path.join(tests_dir, file_name), encoding="utf-8") as fh:
            source = fh.read()
        for module_name, names in IMPORT_FROM.findall(source):
            names = re.sub(r"#[^\n]*", "", names).strip("()")
            found.setdefault(module_name, set()).update(
                part.split()[0] for part in names.split(",") if part.split())  # "x as y": x
    return found


# ---- selection --------------------------------------------------------------------------------------------------
def _walk(value, depth: int = 0):
    """Yield value and everything nested in lists, tuples, sets and dict values."""
    yield value
    if depth > 4:
        return
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _walk(v, depth + 1)


def _is_config_class(value) -> bool:
    return isinstance(value, type) and value.__name__.endswith("Config") and value.__name__ in PEFT_CONFIG_NAMES


def _is_config_object(value) -> bool:
    return not isinstance(value, type) and type(value).__name__ in PEFT_CONFIG_NAMES


def _non_default(field: str, value) -> bool:
    default = UNIMPLEMENTED_LORA_FIELDS[field]
    return value is not None and value != default and not (default is None and value in ({}, []))


def _kwargs_problem(kwargs: dict) -> str | None:
    """Why a dict of LoraConfig keyword arguments uses a feature lorakit lacks, else None."""
    for key, value in kwargs.items():
        if key in UNIMPLEMENTED_LORA_FIELDS and _non_default(key, value):
            return f"{key}={value!r}"
        if key == "init_lora_weights" and isinstance(value, str) and value.lower() in UNIMPLEMENTED_INITS:
            return f"init_lora_weights={value!r}"
        if key == "runtime_config" and getattr(value, "ephemeral_gpu_offload", False):
            return "runtime_config.ephemeral_gpu_offload"
    return None


def params_reason(params: dict) -> tuple[bool, str] | None:
    """(plain?, why) from a test's parameters when they name a config (class, object or kwargs); None when they
    name none."""
    saw_config = False
    for value in _walk(list(params.values())):
        if isinstance(value, type) and OTHER_MODEL_WORDS.fullmatch(value.__name__):
            return False, f"model class {value.__name__}"
        if _is_config_class(value):
            saw_config = True
            if value.__name__ not in LORA_CONFIG_NAMES:
                return False, f"config {value.__name__}"
        elif _is_config_object(value):
            saw_config = True
            if type(value).__name__ not in LORA_CONFIG_NAMES:
                return False, f"config {type(value).__name__}"
            fields = {k: getattr(value, k) for k in UNIMPLEMENTED_LORA_FIELDS if hasattr(value, k)}
            fields["init_lora_weights"] = getattr(value, "init_lora_weights", True)
            problem = _kwargs_problem(fields)
            if problem:
                return False, f"feature {problem}"
        elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            problem = _kwargs_problem(value)
            if problem:
                return False, f"feature {problem}"
    return (True, "LoRA parameters") if saw_config else None


def source_reason(source: str) -> tuple[bool, str]:
    """(plain?, why) from a test function's source: it must build a LoraConfig, and name no other adapter config,
    no LoRA feature lorakit lacks and no model class lorakit lacks."""
    names = set(re.findall(r"\b\w+Config\b", source)) & PEFT_CONFIG_NAMES
    others = sorted(names - LORA_CONFIG_NAMES)
    if others:
        return False, f"config {others[0]}"
    match = FEATURE_WORDS.search(source) or OTHER_MODEL_WORDS.search(source)
    if match:
        return False, f"feature {match.group(0)}"
    if "LoraConfig" not in names:
        return False, "no LoraConfig"
    return True, "LoRA source"


_SOURCE_VERDICTS: dict[object, tuple[bool, str]] = {}  # per test function: parametrized tests share one


def plain_lora_reason(item) -> tuple[bool, str]:
    """Whether a collected PEFT test is a plain-LoRA test, and why (the definition of the measured set)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        verdict = params_reason(callspec.params)
        if verdict is not None:
            return verdict
    function = getattr(item, "function", None)
    # the test's own code: tests under one decorator (functools.wraps) share the wrapper's __code__
    unwrapped = inspect.unwrap(function) if callable(function) else function
    key = getattr(unwrapped, "__code__", None) or id(function)
    if key not in _SOURCE_VERDICTS:
        try:
            _SOURCE_VERDICTS[key] = source_reason(inspect.getsource(unwrapped))
        except (OSError, TypeError):
            _SOURCE_VERDICTS[key] = (False, "no source")
    return _SOURCE_VERDICTS[key]


# ---- hooks ------------------------------------------------------------------------------------------------------
def _read_ids(variable: str) -> set[str] | None:
    path = os.environ.get(variable)
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return set(json.load(fh))


def _no_hub() -> None:
    """This machine has no Hub: every request fails at once as offline. PEFT's tests switch offline mode off for a
    model's first download (testing_utils.hub_online_once), which would otherwise retry for ~45 s per test."""
    import huggingface_hub.constants

    huggingface_hub.constants.is_offline_mode = lambda: True


def pytest_configure(config) -> None:
    _no_hub()
    PEFT_CONFIG_NAMES.update(_peft_config_names())  # before the swap: PEFT's own classes
    if os.environ.get("PEFT_SUITE_MODE") == "lorakit":
        config._peft_suite_swapped = swap_peft_names(os.path.join(str(config.rootpath), "tests"))


def pytest_collection_modifyitems(session, config, items) -> None:
    only, skip = _read_ids("PEFT_SUITE_ONLY"), _read_ids("PEFT_SUITE_SKIP") or set()
    selected, kept, dropped = [], [], []
    for item in items:
        plain, _ = plain_lora_reason(item)
        if plain:
            selected.append(item.nodeid)
        if plain and (only is None or item.nodeid in only) and item.nodeid not in skip:
            kept.append(item)
        else:
            dropped.append(item)
    if os.environ.get("PEFT_SUITE_SELECTED"):
        with open(os.environ["PEFT_SUITE_SELECTED"], "w", encoding="utf-8") as fh:
            json.dump(selected, fh)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


class _Results:
    """Accumulates the phases of each test and writes one JSON line when the test is done."""

    def __init__(self, path: str | None) -> None:
        self.fh = open(path, "a", encoding="utf-8") if path else None
        self.current: dict[str, dict] = {}

    def add(self, report) -> None:
        entry = self.current.setdefault(report.nodeid, {"id": report.nodeid, "outcome": "passed", "duration": 0.0})
        entry["duration"] += report.duration
        if report.outcome == "failed" and entry["outcome"] != "failed":
            entry.update(outcome="failed", phase=report.when, **_failure(report))
        elif report.outcome == "skipped" and entry["outcome"] == "passed":
            entry.update(outcome="skipped", message=_skip_reason(report))
        if report.when == "teardown":
            self.write(self.current.pop(report.nodeid))

    def write(self, entry: dict) -> None:
        if self.fh:
            self.fh.write(json.dumps(entry) + "\n")
            self.fh.flush()


RESULTS = _Results(os.environ.get("PEFT_SUITE_OUT"))


def pytest_runtest_logreport(report) -> None:
    RESULTS.add(report)


def pytest_collectreport(report) -> None:
    if report.failed:
        RESULTS.write({"id": report.nodeid, "outcome": "collect_error", **_failure(report)})


def _failure(report) -> dict:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return {"message": crash.message[:2000], "path": crash.path, "line": crash.lineno}
    text = str(report.longrepr)
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-1:]
    return {"message": "\n".join(lines)[:2000]}


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session) -> None:
    if RESULTS.fh:
        RESULTS.fh.close()
