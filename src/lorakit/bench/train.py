"""Training step speed and memory: lorakit against HuggingFace PEFT on the same workload, in one run.

    lorakit bench train --json out.json        # ~30-60 min on 2 busy cores: 3 repetitions of every setting
    lorakit bench train --quick                # a smoke run (a minute or two): 1 repetition, 1 x 32 tokens

Workload (workload.py): the embedded SmolLM2-135M-Instruct, LoRA r=16, alpha=32 on all linear layers, AdamW, a
batch of 4 x 256 random tokens, the same adapter initialisation and the same batches for both libraries.
Settings: fp32, bf16 (weights loaded in bf16), autocast (fp32 weights, bf16 autocast), and lorakit's default
(what `lorakit train` does by default: train.bf16=auto). Variants (--variants): lora, dora, qlora (lorakit
only) at lorakit's default and PEFT's bf16 setting.

Each measurement runs in a fresh process (harness.py): load, warm-up steps, timed steps; the settings and the
two libraries take turns, repetition after repetition, and the median repetition is reported. Speed is tokens
per second of the median timed step (wall clock); memory is the process's peak RSS. lorakit's runs get the
malloc `lorakit train` gets (tcmalloc when installed), PEFT's the C library's unless --same-malloc;
each row names its malloc. Written to --json:
`speedup_vs_peft` (lorakit's default vs PEFT's fastest setting) and `memory_ratio_vs_peft` (its peak RSS vs
PEFT's at the same precision, bf16), per-setting rows with the ratios at equal settings, the loss curves of every
run (plotted to --plot) and how far each lies from PEFT fp32's compared with PEFT bf16's own distance (bf16
rounding). Never a timed test: tests/integration/test_bench.py checks the structure of a --quick run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from lorakit.bench import harness
from lorakit.bench.workload import LIBRARIES, SETTINGS, VARIANTS

FULL = dict(batch=4, seq=256, steps=6, warmup=2, repeats=3)
QUICK = dict(batch=1, seq=32, steps=2, warmup=1, repeats=1)
# settings of equal precision, for the ratios: lorakit's default computes in bf16
SAME_PRECISION = {"fp32": "fp32", "bf16": "bf16", "autocast": "autocast", "default": "bf16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--settings", default=",".join(SETTINGS), metavar="S,S",
                        help=f"settings to run (default: all: {','.join(SETTINGS)})")
    parser.add_argument("--variants", default="lora", metavar="V,V",
                        help=f"LoRA variants ({','.join(VARIANTS)}; default lora). dora/qlora run at lorakit's "
                             "default setting and PEFT's bf16 one, beside plain LoRA at those settings")
    parser.add_argument("--no-peft", action="store_true", help="lorakit only (no ratios)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    parser.add_argument("--memory-split", action="store_true",
                        help="also measure the memory split (weights, activations, logits, optimizer) in each run")
    parser.add_argument("--plot", metavar="PNG", help="loss curves as a PNG (default: next to --json)")
    parser.add_argument("--same-malloc", action="store_true",
                        help="run PEFT on the malloc lorakit's runs get (tcmalloc when installed) "
                             "instead of the C library's, which a PEFT user's program gets")


def add_workload_arguments(parser: argparse.ArgumentParser, defaults: dict = FULL, batch_option: bool = True,
                           quick: dict = QUICK) -> None:
    parser.add_argument("--model", default="smollm2", help="base model (default: the embedded smollm2)")
    if batch_option:
        parser.add_argument("--batch", type=int, default=None,
                            help=f"sequences per step (default {defaults['batch']}; --quick {quick['batch']})")
    parser.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (default {defaults['seq']}; "
                                                              f"--quick {quick['seq']})")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=int, default=32, help="LoRA alpha (default 32)")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per run (default {defaults['steps']})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {defaults['warmup']})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"runs of each setting, the median is reported (default {defaults['repeats']})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="adapter initialisation and batches")
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes (see the defaults)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")


def resolve(args: argparse.Namespace, defaults: dict = FULL, quick: dict = QUICK) -> None:
    """Fill the options left unset from the full or quick defaults; refuse bad values."""
    chosen = quick if args.quick else defaults
    for key in ("batch", "seq", "steps", "warmup", "repeats"):
        if not hasattr(args, key):
            continue
        if getattr(args, key) is None:
            setattr(args, key, chosen[key])
        value = getattr(args, key)
        if value < (0 if key == "warmup" else 1):
            raise ValueError(f"--{key} must be {'>= 0' if key == 'warmup' else '>= 1'}, got {value}")


def _listed(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise ValueError(f"{option} {value!r}: choose from {', '.join(allowed)}")
    return items


def runs_to_make(args) -> list[tuple[str, str, str]]:
    """(library, setting, variant) of every run, in the order they take turns."""
    settings = _listed(args.settings, SETTINGS, "--settings")
    variants = _listed(args.variants, VARIANTS, "--variants")
    libraries = ["lorakit"] if args.no_peft else list(LIBRARIES)
    runs = [(lib, s, "lora") for s in settings for lib in libraries if not (s == "default" and lib == "peft")]
    for variant in (v for v in variants if v != "lora"):
        for lib, setting in (("lorakit", "default"), ("peft", "bf16")):
            if lib in libraries and not (variant == "qlora" and lib == "peft"):
                for needed in ((lib, setting, "lora"), (lib, setting, variant)):
                    if needed not in runs:
                        runs.append(needed)
    return runs


# ---- in the worker process ----------------------------------------------------------------------------------

def measure(spec: dict) -> dict:
    """Build, warm up, time `steps` steps; losses of every step (warm-up included)."""
    import torch

    from lorakit.bench.workload import TrainingStep, random_batch

    torch.manual_seed(spec["seed"])
    run = TrainingStep(spec["library"], spec["setting"], spec["model"], spec["r"], spec["alpha"], spec["lr"],
                       spec.get("init_path"), spec.get("variant", "lora"))
    losses, wall, cpu = [], [], []
    for step in range(spec["warmup"] + spec["steps"]):
        batch = random_batch(step, spec["batch"], spec["seq"], run.vocab, spec["seed"])
        started, started_cpu = time.perf_counter(), time.process_time()
        losses.append(run.step(batch))
        if step >= spec["warmup"]:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    step_seconds = harness.median(wall)
    result = {"tokens_per_second": round(spec["batch"] * spec["seq"] / step_seconds, 2),
              "step_seconds": [round(t, 4) for t in wall], "cpu_seconds": [round(t, 4) for t in cpu],
              "losses": losses, "threads": torch.get_num_threads()}
    if spec.get("memory_split"):
        result["memory_split"] = run.memory_split(random_batch(10 ** 6, spec["batch"], spec["seq"], run.vocab,
                                                               spec["seed"]))
    return result


# ---- in the parent process ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    resolve(args)
    runs = runs_to_make(args)
    print(f"lorakit bench train: {args.model}, LoRA r={args.r} alpha={args.alpha} all-linear, AdamW, batch "
          f"{args.batch} x {args.seq} tokens, {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} "
          f"repetition(s) of {len(runs)} runs, each in a fresh process; load average {harness.load_average()}",
          flush=True)
    results: dict[tuple, list[dict]] = {key: [] for key in runs}
    failures: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        init_paths = {}
        for variant in {v for _, _, v in runs}:
            init_paths[variant] = os.path.join(tmp, f"init-{variant}.safetensors")
            from lorakit.bench.workload import write_initial_adapter

            write_initial_adapter(init_paths[variant], args.model, args.r, args.alpha, args.seed, variant)
        for repeat in range(args.repeats):
            order = runs if repeat % 2 == 0 else list(reversed(runs))  # who goes first alternates too
            for library, setting, variant in order:
                spec = {"kind": "train", "library": library, "setting": setting, "variant": variant,
                        "model": args.model, "batch": args.batch, "seq": args.seq, "r": args.r,
                        "alpha": args.alpha, "lr": args.lr, "steps": args.steps, "warmup": args.warmup,
                        "seed": args.seed, "threads": args.threads, "init_path": init_paths[variant],
                        "memory_split": args.memory_split}
                if args.same_malloc:
                    spec["malloc"] = "preferred"
                try:
                    result = harness.run_worker(spec)
                except harness.WorkerError as err:  # one failed run costs its row, not the others' results
                    failures.append({"library": library, "setting": setting, "variant": variant, "error": str(err)})
                    print(f"  run {repeat + 1}: {library:7} {setting:8} {variant:5} FAILED: {err}", flush=True)
                    continue
                results[(library, setting, variant)].append(result)
                print(f"  run {repeat + 1}: {library:7} {setting:8} {variant:5} {result['tokens_per_second']:8.1f} "
                      f"tokens/s  peak RSS {result['peak_rss_mb']:7.0f} MB  (load {result['load_before']:.1f}"
                      f"->{result['load_after']:.1f})  {harness.probe_label(result.get('machine_probe'))}", flush=True)
    report = summarize(args, [key for key in runs if results[key]], results)
    report["failed_runs"] = failures
    print()
    print(format_report(report))
    plot = args.plot or (os.path.splitext(args.json)[0] + "_loss.png" if args.json else None)
    if plot:
        plot_loss_curves(report, plot)
        report["loss_plot"] = plot
    harness.write_json(args.json, report)
    return 1 if failures else 0


def summarize(args, runs, results) -> dict:
    rows = []
    for library, setting, variant in runs:
        measured = results[(library, setting, variant)]
        row = {"library": library, "setting": setting, "variant": variant, "malloc": measured[0].get("malloc"),
               "tokens_per_second": harness.median(r["tokens_per_second"] for r in measured),
               "peak_rss_mb": harness.median(r["peak_rss_mb"] for r in measured),
               "step_seconds": harness.median(harness.median(r["step_seconds"]) for r in measured),
               "cpu_seconds": harness.median(harness.median(r["cpu_seconds"]) for r in measured),
               # tokens per second of this process's CPU time: steadier than the wall clock on a shared machine
               "tokens_per_cpu_second": harness.median(args.batch * args.seq / harness.median(r["cpu_seconds"])
                                                       for r in measured),
               "load_average": harness.median(r["load_before"] for r in measured),
               "repeats": [{k: r.get(k) for k in ("tokens_per_second", "peak_rss_mb", "load_before", "load_after",
                                                  "machine_probe")} for r in measured],
               "losses": measured[0]["losses"]}
        if "memory_split" in measured[0]:
            row["memory_split"] = measured[0]["memory_split"]
        rows.append(row)
    by_key = {(r["library"], r["setting"], r["variant"]): r for r in rows}
    for row in rows:  # lorakit vs PEFT at the same precision
        peft_row = by_key.get(("peft", SAME_PRECISION[row["setting"]], row["variant"]))
        if row["library"] == "lorakit" and peft_row:
            row["speedup_vs_peft_same_setting"] = _ratio(row["tokens_per_second"], peft_row["tokens_per_second"])
            row["memory_ratio_vs_peft_same_setting"] = _ratio(row["peak_rss_mb"], peft_row["peak_rss_mb"])
    report = {"benchmark": "train", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": harness.machine(r.get("machine_probe") for key in runs for r in results[key]),
              "workload": {"model": args.model, "r": args.r, "alpha": args.alpha, "target_modules": "all-linear",
                           "optimizer": "AdamW, fused where PyTorch has the kernel", "lr": args.lr,
                           "batch": args.batch, "seq": args.seq,
                           "tokens_per_step": args.batch * args.seq, "steps": args.steps, "warmup": args.warmup,
                           "repeats": args.repeats, "threads": args.threads, "quick": args.quick},
               "rows": rows}
    lora = {k: v for k, v in by_key.items() if k[2] == "lora"}
    peft_rows = [r for k, r in lora.items() if k[0] == "peft"]
    default = lora.get(("lorakit", "default", "lora"))
    if peft_rows and default:
        fastest = max(peft_rows, key=lambda r: r["tokens_per_second"])
        report["peft_fastest_setting"] = fastest["setting"]
        report["speedup_vs_peft"] = _ratio(default["tokens_per_second"], fastest["tokens_per_second"])
        fastest_cpu = max(peft_rows, key=lambda r: r["tokens_per_cpu_second"])
        report["speedup_vs_peft_cpu_time"] = _ratio(default["tokens_per_cpu_second"],
                                                    fastest_cpu["tokens_per_cpu_second"])
        same = lora.get(("peft", SAME_PRECISION["default"], "lora"))
        report["memory_ratio_vs_peft"] = _ratio(default["peak_rss_mb"], same["peak_rss_mb"]) if same else None
    exact, peft_fp32 = lora.get(("lorakit", "fp32", "lora")), lora.get(("peft", "fp32", "lora"))
    if exact and peft_fp32:
        report["fp32_speedup_vs_peft"] = _ratio(exact["tokens_per_second"], peft_fp32["tokens_per_second"])
        report["fp32_speedup_vs_peft_cpu_time"] = _ratio(exact["tokens_per_cpu_second"],
                                                         peft_fp32["tokens_per_cpu_second"])
        report["fp32_memory_ratio_vs_peft"] = _ratio(exact["peak_rss_mb"], peft_fp32["peak_rss_mb"])
    report["variants"] = variant_ratios(by_key)
    report["loss_agreement"] = loss_agreement(by_key)
    return report


def variant_ratios(by_key: dict) -> dict:
    """Step time of each variant over plain LoRA's, per library, at the setting the variant ran at."""
    out = {}
    for (library, setting, variant), row in by_key.items():
        plain = by_key.get((library, setting, "lora"))
        if variant != "lora" and plain:
            out[f"{library}:{variant}"] = {"setting": setting,
                                           "step_time_ratio": _ratio(plain["tokens_per_second"],
                                                                     row["tokens_per_second"]),
                                           "peak_rss_ratio": _ratio(row["peak_rss_mb"], plain["peak_rss_mb"])}
    return out


def loss_agreement(by_key: dict) -> dict:
    """Largest |loss - PEFT fp32's loss| over the steps, per run; PEFT bf16's own distance is the yardstick of
    bf16 rounding (a run within it matches PEFT fp32 to within bf16 rounding)."""
    reference = by_key.get(("peft", "fp32", "lora"))
    if not reference:
        return {}
    out = {}
    for (library, setting, variant), row in by_key.items():
        if variant == "lora" and (library, setting) != ("peft", "fp32"):
            out[f"{library}:{setting}"] = round(max(abs(a - b) for a, b in zip(row["losses"], reference["losses"])), 6)
    yardstick = [out.get(f"peft:{s}") for s in ("bf16", "autocast")]
    yardstick = max((y for y in yardstick if y is not None), default=None)
    default = out.get("lorakit:default")
    return {"max_abs_diff_vs_peft_fp32": out, "bf16_yardstick": yardstick,
            "default_within_bf16_rounding": None if yardstick is None or default is None else default <= yardstick}


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def format_report(report: dict) -> str:
    header = ["library", "setting", "variant", "malloc", "tokens/s", "tokens/CPU-s", "peak RSS MB", "x PEFT speed",
              "x PEFT memory", "load"]
    rows = [[r["library"], r["setting"], r["variant"], r["malloc"], r["tokens_per_second"], r["tokens_per_cpu_second"],
             r["peak_rss_mb"],
             r.get("speedup_vs_peft_same_setting"), r.get("memory_ratio_vs_peft_same_setting"), r["load_average"]]
            for r in report["rows"]]
    lines = [harness.table(header, rows)]
    if report.get("speedup_vs_peft") is not None:
        memory = report.get("memory_ratio_vs_peft")
        lines.append(f"lorakit default vs PEFT's fastest setting ({report['peft_fastest_setting']}): "
                     f"{report['speedup_vs_peft']:.2f}x tokens/s ({report['speedup_vs_peft_cpu_time']:.2f}x per CPU "
                     "second)" + (f"; peak RSS {memory}x PEFT bf16's" if memory is not None else
                                  " (peak RSS against PEFT bf16: not measured, bf16 was not among --settings)"))
    if report.get("fp32_speedup_vs_peft") is not None:
        lines.append(f"lorakit fp32 vs PEFT fp32: {report['fp32_speedup_vs_peft']:.2f}x tokens/s "
                     f"({report['fp32_speedup_vs_peft_cpu_time']:.2f}x per CPU second), peak RSS "
                     f"{report['fp32_memory_ratio_vs_peft']}x")
    for name, values in report.get("variants", {}).items():
        lines.append(f"{name} / LoRA step time at {values['setting']}: {values['step_time_ratio']}x")
    agreement = report.get("loss_agreement") or {}
    if agreement.get("max_abs_diff_vs_peft_fp32"):
        diffs = ", ".join(f"{k} {v:.4f}" for k, v in agreement["max_abs_diff_vs_peft_fp32"].items())
        lines.append(f"largest loss difference from PEFT fp32 over the steps: {diffs}")
    lines.append(harness.probe_report_line(report["machine"]["probe"]))
    return "\n".join(lines)


def plot_loss_curves(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in report["rows"]:
        if row["variant"] != "lora":
            continue
        style = "-" if row["library"] == "lorakit" else "--"
        ax.plot(range(1, len(row["losses"]) + 1), row["losses"], style, marker="o", markersize=3,
                label=f"{row['library']} {row['setting']}")
    workload = report["workload"]
    ax.set_title(f"{workload['model']}: LoRA r={workload['r']}, {workload['batch']}x{workload['seq']} random tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
