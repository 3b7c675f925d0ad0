#!/usr/bin/env python
"""Run HuggingFace PEFT's own plain-LoRA tests against lorakit and print the parity figure.

    python tools/peft_suite.py /path/to/peft-checkout                 # everything (baseline cached after once)
    python tools/peft_suite.py /path/to/peft-checkout -k merge --files tests/test_custom_models.py
    python tools/peft_suite.py /path/to/peft-checkout --json report.json --examples 3

Given a checkout of PEFT's repository (never part of lorakit), the plain-LoRA tests (tools/peft_suite_plugin.py,
docs/peft-compatibility.md) run twice: with PEFT as they are (the baseline), then with the `peft` names the tests
import swapped for lorakit's. The figure is the share of the baseline's passes that also pass with lorakit; the
failures are grouped by cause (FAILURE_CAUSES, regexes over the failure messages).

The baseline's results are cached (JSON, keyed by the checkout's tests, PEFT's source, torch and transformers), so
PEFT's tests run once; a later run with a selection (-k, --files) only runs the baseline tests not yet cached.
Both runs use the checkout's `src/` as the `peft` package (the code the tests were written for); --peft-source
installed uses the installed peft instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
LORAKIT_SRC = os.path.join(os.path.dirname(TOOLS_DIR), "src")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lorakit", "peft_suite")
# PEFT test files that never hold plain-LoRA tests lorakit could run (GPU, other libraries' integrations)
EXCLUDED_FILES = ("test_gpu_examples.py", "test_common_gpu.py", "test_lora_megatron.py", "test_gptqmodel.py",
                  "test_stablediffusion.py")

# (cause, regex), searched in "<test id>\n<ExceptionType: message>" of a failure (or "skipped: reason"). First match
# wins; specific causes come before general ones. The justification of each cause is in docs/peft-compatibility.md.
# "PEFT internals": tests that reach into PEFT's implementation (its layer classes, BaseTuner machinery, private
# attributes, module globals they monkeypatch), which a drop-in API does not reproduce. "deliberate": lorakit
# differs on purpose. Anything else falls to "other": a failure to fix or to justify here.
FAILURE_CAUSES: list[tuple[str, str]] = [
    ("deliberate: safetensors only", r"safe_serialization=False is not supported|::test_save_pretrained_pickle\["),
    ("deliberate: MHA out_proj update applied once", r"out_proj.*(twice|doubled)"),
    ("deliberate: mixed-adapter batches PEFT refuses",
     r"::test_mixed_adapter_batches_(mha|lora_with_dora)_raises"),
    ("deliberate: MHA fused fast path off while an adapter acts", r"::test_mha_exposes_attributes"),
    ("deliberate: bad config values refused when built", r"::test_lora_with_bias_argument\[invalid\]"),
    ("deliberate: get_peft_model on a PeftModel refused", r"::test_get_peft_model_repeated_invocation"),
    ("deliberate: last adapter deleted restores the modules",
     r"::test_delete_adapter_multiple_adapters_with_modules_to_save"),
    ("PEFT internals: layer classes and their methods",
     r"isinstance\(.*(BaseTunerLayer|LoraLayer)|BaseTunerLayer|LoraLayer\b|_register_custom_module|_restore_weights"
     r"|'lora_variants'|has no attribute '(enable_adapters|set_adapter)'|::TestDynamicDispatch::"
     r"|::test_multiple_active_adapters_forward\[|::test_get_peft_modules_module_name_is_suffix_of_another_module"
     r"|test_low_level_api.py::TestLowLevelFunctional::test_modules_to_save|::test_lora_plus_embedding_lr"
     r"|::test_dora_params_have_gradients|::test_dora_unmerge_inverts_merge_for_fan_in_fan_out_layer"
     r"|::TestDoraCaching::|::test_transient_attribute_access_non_existing_adapter"),
    ("PEFT internals: BaseTuner machinery and module globals",
     r"::TestTunerStateDictKeyPrefixes::|::TestDefaultTargetModules::|::test_hotswap_missing_key_works"
     r"|quantization_backend_(bnb|irregular)"),
    ("PEFT internals: version bookkeeping", r"::test_peft_version_"),
    ("tool: ids renamed by the swap (pass renamed)", r"::test_no_infinite_recursion\[.*\nmissing:"),
    ("collection error", r"\ncollect_error"),
    ("other", r""),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peft_dir", help="a checkout of https://github.com/huggingface/peft (its tests/ and src/)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression restricting the tests")
    parser.add_argument("--files", nargs="+", help="test files (relative to the checkout, e.g. "
                        "tests/test_custom_models.py); default: every tests/test_*.py but EXCLUDED_FILES")
    parser.add_argument("--peft-source", choices=("checkout", "installed"), default="checkout",
                        help="which peft package the tests run with (default: the checkout's src/)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where baseline results are cached")
    parser.add_argument("--refresh-baseline", action="store_true", help="rerun the baseline even when cached")
    parser.add_argument("--json", dest="json_out", help="write the full report (every test's outcome) here")
    parser.add_argument("--examples", type=int, default=2, help="example test ids printed per cause")
    parser.add_argument("--cause", help="print every failing test id (with its message) of this cause")
    parser.add_argument("--baseline-only", action="store_true", help="run (and cache) the baseline, then stop")
    parser.add_argument("--log-dir", help="keep pytest's output here (default: a temporary directory)")
    parser.add_argument("--lorakit-src", default=LORAKIT_SRC,
                        help="the lorakit source tree to test (default: this checkout's src/)")
    return parser.parse_args(argv)


# ---- running pytest ---------------------------------------------------------------------------------------------
def test_files(peft_dir: str, files: list[str] | None) -> list[str]:
    if files:
        return files
    names = sorted(f for f in os.listdir(os.path.join(peft_dir, "tests"))
                   if f.startswith("test_") and f.endswith(".py") and f not in EXCLUDED_FILES)
    return [os.path.join("tests", f) for f in names]


def run_pytest(peft_dir: str, mode: str, files: list[str], keyword: str | None, peft_source: str, log_path: str,
               only: list[str] | None = None, skip: list[str] | None = None,
               lorakit_src: str = LORAKIT_SRC) -> tuple[list[dict], list[str]]:
    """Run the selected tests in a subprocess; returns (per-test results, every plain-LoRA id selected)."""
    with tempfile.TemporaryDirectory(prefix="peft_suite_") as tmp:
        env = dict(os.environ, PEFT_SUITE_MODE=mode, PEFT_SUITE_OUT=os.path.join(tmp, "results.jsonl"),
                   PEFT_SUITE_SELECTED=os.path.join(tmp, "selected.json"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for name, ids in (("PEFT_SUITE_ONLY", only), ("PEFT_SUITE_SKIP", skip)):
            if ids is not None:
                env[name] = os.path.join(tmp, f"{name}.json")
                with open(env[name], "w", encoding="utf-8") as fh:
                    json.dump(sorted(ids), fh)
        paths = [TOOLS_DIR, lorakit_src] + ([os.path.join(peft_dir, "src")] if peft_source == "checkout" else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        cmd = [sys.executable, "-m", "pytest", *files, "-p", "peft_suite_plugin", "-p", "no:cacheprovider",
               "-o", "addopts=", "-q", "--no-header", "--continue-on-collection-errors", "-rN", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
        if keyword:
            cmd += ["-k", keyword]
        with open(log_path, "w", encoding="utf-8") as log:
            subprocess.run(cmd, cwd=peft_dir, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        results = []
        if os.path.exists(env["PEFT_SUITE_OUT"]):
            with open(env["PEFT_SUITE_OUT"], encoding="utf-8") as fh:
                results = [json.loads(line) for line in fh if line.strip()]
        selected = []
        if os.path.exists(env["PEFT_SUITE_SELECTED"]):
            with open(env["PEFT_SUITE_SELECTED"], encoding="utf-8") as fh:
                selected = json.load(fh)
        return results, selected


# ---- the baseline cache -----------------------------------------------------------------------------------------
def baseline_key(peft_dir: str, peft_source: str) -> str:
    """A hash of PEFT's tests and source and of the libraries they run on: a change to any means a new baseline."""
    digest = hashlib.sha256()
    roots = [os.path.join(peft_dir, "tests")] + ([os.path.join(peft_dir, "src")] if peft_source == "checkout" else [])
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(f for f in filenames if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                digest.update(os.path.relpath(path, peft_dir).encode())
                with open(path, "rb") as fh:
                    digest.update(fh.read())
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers, peft; print(torch.__version__, "
                               "transformers.__version__, peft.__version__ if %r == 'installed' else '')" % peft_source],
                              capture_output=True, text=True, check=True).stdout
    digest.update(versions.encode())
    return digest.hexdigest()[:16]


def load_cache(path: str) -> dict:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return {"results": {}, "not_selected_runs": []}


def save_cache(path: str, cache: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(cache, fh)
    os.replace(tmp, path)


# ---- classification ---------------------------------------------------------------------------------------------
def failure_text(result: dict) -> str:
    if result["outcome"] == "skipped":
        return f"skipped: {result.get('message', '')}"
    if result["outcome"] == "missing":
        return "missing: not run (the test module failed to import under lorakit?)"
    return result.get("message", "")


def classify(result: dict) -> str:
    text = f"{result.get('id', '')}\n" + ("collect_error " if result["outcome"] == "collect_error" else "") + \
        failure_text(result)
    for cause, pattern in FAILURE_CAUSES:
        if re.search(pattern, text, flags=re.MULTILINE):
            return cause
    return "other"


def summarize(selected: list[str], baseline: dict[str, dict], lorakit: dict[str, dict]) -> dict:
    base_pass = [i for i in selected if baseline.get(i, {}).get("outcome") == "passed"]
    passed = [i for i in base_pass if lorakit.get(i, {}).get("outcome") == "passed"]
    failures = {i: lorakit.get(i, {"id": i, "outcome": "missing"}) for i in base_pass if i not in set(passed)}
    by_cause: dict[str, list[str]] = defaultdict(list)
    for test_id, result in failures.items():
        by_cause[classify(result)].append(test_id)
    return {
        "selected": len(selected),
        "baseline_outcomes": dict(Counter(baseline.get(i, {}).get("outcome", "not run") for i in selected)),
        "baseline_passed": len(base_pass),
        "lorakit_passed": len(passed),
        "rate": len(passed) / len(base_pass) if base_pass else 0.0,
        "causes": {cause: sorted(ids) for cause, ids in sorted(by_cause.items(), key=lambda kv: -len(kv[1]))},
        "failures": failures,
    }


def print_report(summary: dict, examples: int, cause: str | None) -> None:
    print(f"plain-LoRA tests selected: {summary['selected']} (baseline outcomes: {summary['baseline_outcomes']})")
    print(f"pass with PEFT (baseline): {summary['baseline_passed']}")
    print(f"pass with lorakit:         {summary['lorakit_passed']} ({100 * summary['rate']:.1f}%)")
    if summary["causes"]:
        print("\nfailures by cause:")
        width = max(len(c) for c in summary["causes"])
        for name, ids in summary["causes"].items():
            print(f"  {name:<{width}}  {len(ids):5d}")
            for test_id in ids[:examples]:
                print(f"  {'':<{width}}         {test_id}\n  {'':<{width}}           "
                      f"{failure_text(summary['failures'][test_id]).splitlines()[0][:160] if failure_text(summary['failures'][test_id]) else ''}")
    if cause:
        print(f"\nevery failure of cause {cause!r}:")
        for test_id in summary["causes"].get(cause, []):
            print(f"  {test_id}\n      {failure_text(summary['failures'][test_id])[:400]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    peft_dir = os.path.abspath(args.peft_dir)
    if not os.path.isdir(os.path.join(peft_dir, "tests")):
        sys.exit(f"{peft_dir} has no tests/ directory; give a checkout of PEFT's repository")
    files = test_files(peft_dir, args.files)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="peft_suite_logs_")
    os.makedirs(log_dir, exist_ok=True)
    cache_path = os.path.join(args.cache_dir, f"baseline-{baseline_key(peft_dir, args.peft_source)}.json")
    cache = {"results": {}} if args.refresh_baseline else load_cache(cache_path)

    start = time.time()
    print(f"baseline (PEFT): running the selected plain-LoRA tests not in {cache_path} ...", flush=True)
    results, selected = run_pytest(peft_dir, "peft", files, args.keyword, args.peft_source,
                                   os.path.join(log_dir, "baseline.log"), skip=list(cache["results"]))
    cache["results"].update({r["id"]: r for r in results if r["outcome"] != "collect_error"})
    save_cache(cache_path, cache)
    baseline = {i: cache["results"][i] for i in selected if i in cache["results"]}
    base_pass = [i for i in selected if baseline.get(i, {}).get("outcome") == "passed"]
    print(f"  {len(selected)} selected, {len(results)} run now, {len(base_pass)} pass with PEFT "
          f"({time.time() - start:.0f}s)", flush=True)

    if args.baseline_only:
        return 0
    start = time.time()
    print("lorakit: running the baseline's passes with the peft names swapped ...", flush=True)
    results, _ = run_pytest(peft_dir, "lorakit", files, args.keyword, args.peft_source,
                            os.path.join(log_dir, "lorakit.log"), only=base_pass, lorakit_src=args.lorakit_src)
    lorakit = {r["id"]: r for r in results}
    print(f"  done ({time.time() - start:.0f}s); pytest logs in {log_dir}\n", flush=True)

    summary = summarize(selected, baseline, lorakit)
    print_report(summary, args.examples, args.cause)
    if args.json_out:
        report = {key: value for key, value in summary.items() if key != "failures"}
        report["failures"] = {i: {"cause": classify(r), "text": failure_text(r)} for i, r in summary["failures"].items()}
        report["files"], report["keyword"], report["peft_source"] = files, args.keyword, args.peft_source
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        print(f"\nreport written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
