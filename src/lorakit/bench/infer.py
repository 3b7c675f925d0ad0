"""Inference overhead of adapters: latency of the base model, a merged adapter, an unmerged one, and a batch
whose rows use 8 different adapters, as ratios to the base.

    lorakit bench infer --json infer.json     # SmolLM2-135M, LoRA r=16 all-linear, batch 8
    lorakit bench infer --quick               # a smoke run

Two measures, both on a batch of --batch rows (eval mode, no gradients):
  forward  one forward over --seq tokens per row (a prefill): milliseconds per forward
  decode   greedy generation of --new-tokens tokens after a --prompt-tokens prompt, with the KV cache:
           milliseconds per generated token (the whole generate() divided by the new tokens)
Modes: base (the plain transformers model), merged (lorakit, adapter merged into the weights, its layers still
in place), unmerged (one adapter computed beside the weights), mixed (--adapters adapters loaded, row i uses
adapter i % N: `adapter_names=`), and peft-unmerged / peft-mixed for reference (--no-peft to skip). lorakit's
modes are built side by side in one fresh process and timed in turns, iteration after iteration (so that load
changes on a shared machine hit them alike); PEFT's modes likewise in another process, with a base model of
their own; ratios are to the base timed in the same process; medians of --repeats runs. Targets (docs/performance.md): merged
<= 1.02x base, unmerged <= 1.10x, mixed <= 1.25x.
"""

from __future__ import annotations

import argparse
import time

from lorakit.bench import harness

MODES = ("base", "merged", "unmerged", "mixed", "peft-unmerged", "peft-mixed")
FULL = dict(batch=8, seq=128, prompt_tokens=16, new_tokens=32, iterations=5, repeats=3)
QUICK = dict(batch=2, seq=16, prompt_tokens=4, new_tokens=4, iterations=2, repeats=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="base model (default: the embedded smollm2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model dtype")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--adapters", type=int, default=8, help="adapters in the mixed batch (default 8)")
    for key, text in (("batch", "rows"), ("seq", "tokens per row of the forward"),
                      ("prompt_tokens", "prompt tokens before decoding"), ("new_tokens", "tokens decoded"),
                      ("iterations", "timed forwards / generations per run"),
                      ("repeats", "runs of each mode, the median is reported")):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None,
                            help=f"{text} (default {FULL[key]}; --quick {QUICK[key]})")
    parser.add_argument("--modes", default=",".join(MODES), metavar="M,M", help=f"modes (default all: {','.join(MODES)})")
    parser.add_argument("--no-peft", action="store_true", help="leave out the PEFT modes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")


# ---- in the worker process ----------------------------------------------------------------------------------

def _build(spec: dict):
    import torch

    from lorakit.bench.workload import lora_options, load_base

    torch.manual_seed(spec["seed"])
    model = load_base(spec["model"], spec["dtype"])
    mode = spec["mode"]
    if mode == "base":
        return model.eval(), None
    names = [f"adapter{i}" for i in range(spec["adapters"] if mode.endswith("mixed") else 1)]
    options = lora_options(spec["r"], 2 * spec["r"])
    if mode.startswith("peft"):
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **options), names[0])
        for name in names[1:]:
            wrapped.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **options))
    else:
        import lorakit

        wrapped = lorakit.get_peft_model(model, lorakit.LoraConfig(init_lora_weights=False, **options), names[0])
        for name in names[1:]:
            wrapped.add_adapter(name, lorakit.LoraConfig(init_lora_weights=False, **options))
        if mode == "merged":
            wrapped.merge_adapter()
    wrapped.eval()
    rows = [names[i % len(names)] for i in range(spec["batch"])] if mode.endswith("mixed") else None
    return wrapped, rows


def measure(spec: dict) -> dict:
    """Every mode of spec["modes"] built side by side in this process, then timed in turns, iteration after
    iteration, so that load changes hit them alike: {mode: {forward_ms, decode_ms_per_token, *_cpu_*}}."""
    import torch

    built = {mode: _build(dict(spec, mode=mode)) for mode in spec["modes"]}
    vocab = next(iter(built.values()))[0].config.vocab_size
    generator = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=generator)
    prompt = ids[:, :spec["prompt_tokens"]]
    settings = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False,
                    pad_token_id=0, attention_mask=torch.ones_like(prompt))
    times = {mode: {key: [] for key in ("forward_ms", "decode_ms_per_token", "forward_cpu_ms",
                                          "decode_cpu_ms_per_token")} for mode in built}

    def timed(mode: str, kind: str, per: int, call) -> None:
        started, started_cpu = time.perf_counter(), time.process_time()
        call()
        times[mode][f"{kind}_ms" + ("_per_token" if kind == "decode" else "")].append(
            1000 * (time.perf_counter() - started) / per)
        times[mode][f"{kind}_cpu_ms" + ("_per_token" if kind == "decode" else "")].append(
            1000 * (time.process_time() - started_cpu) / per)

    with torch.no_grad():
        for iteration in range(spec["iterations"] + 1):  # iteration 0 warms every mode up
            order = list(built) if iteration % 2 else list(reversed(built))
            for mode in order:
                model, adapter_names = built[mode]
                extra = {"adapter_names": adapter_names} if adapter_names else {}
                if not iteration:
                    model(input_ids=ids, **extra)
                    model.generate(input_ids=prompt, **settings, **extra)
                    continue
                timed(mode, "forward", 1, lambda: model(input_ids=ids, **extra))
                timed(mode, "decode", spec["new_tokens"],
                      lambda: model.generate(input_ids=prompt, **settings, **extra))
    return {"modes": {mode: {key: harness.median(values) for key, values in measured.items()}
                      for mode, measured in times.items()}, "threads": torch.get_num_threads()}


# ---- in the parent process ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    chosen = QUICK if args.quick else FULL
    for key in FULL:
        if getattr(args, key) is None:
            setattr(args, key, chosen[key])
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.prompt_tokens > args.seq:
        raise ValueError(f"--prompt-tokens ({args.prompt_tokens}) must be at most --seq ({args.seq})")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "base" not in modes:
        raise ValueError(f"--modes {args.modes!r}: choose from {', '.join(MODES)}, base included")
    if args.no_peft:
        modes = [m for m in modes if not m.startswith("peft")]
    print(f"lorakit bench infer: {args.model} ({args.dtype}), LoRA r={args.r} all-linear, batch {args.batch}; forward "
          f"of {args.seq} tokens, decode of {args.new_tokens} tokens after {args.prompt_tokens}; {args.repeats} "
          f"repetition(s), each mode in a fresh process; load average {harness.load_average()}", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    probes = []  # each worker's machine probe (harness.probe_machine): the machine's state
    # lorakit's modes share one process (interleaved, measure()); PEFT's modes another (PEFT's layers would
    # otherwise wrap the same base weights); the two processes take turns, repetition after repetition
    groups = [g for g in ([m for m in modes if not m.startswith("peft")], [m for m in modes if m.startswith("peft")])
              if g]
    if "base" not in groups[-1]:
        groups[-1] = ["base", *groups[-1]]  # each process times the base too: ratios within one process
    for repeat in range(args.repeats):
        for group in (groups if repeat % 2 == 0 else list(reversed(groups))):
            library = "peft" if any(m.startswith("peft") for m in group) else "lorakit"
            spec = {"kind": "infer", "modes": group, "library": library,
                    "model": args.model, "dtype": args.dtype, "r": args.r, "adapters": args.adapters,
                    "batch": args.batch, "seq": args.seq, "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens, "iterations": args.iterations, "seed": args.seed,
                    "threads": args.threads}
            result = harness.run_worker(spec)
            probes.append(result.get("machine_probe"))
            print(f"  run {repeat + 1}: {library} process: {harness.probe_label(probes[-1])}", flush=True)
            base_in_process = result["modes"]["base"]
            for mode, measured in result["modes"].items():
                if mode == "base" and library == "peft":
                    continue
                ratios = {f"{key}_ratio": measured[key] / base_in_process[key] for key in measured}
                results[mode].append({**measured, **ratios, "load_before": result["load_before"]})
                print(f"  run {repeat + 1}: {mode:14} forward {measured['forward_ms']:8.1f} ms   decode "
                      f"{measured['decode_ms_per_token']:7.2f} ms/token   CPU-time ratios to base in the same "
                      f"process {ratios['forward_cpu_ms_ratio']:.3f} / {ratios['decode_cpu_ms_per_token_ratio']:.3f}"
                      f"  (load {result['load_before']:.1f})", flush=True)
    rows = []
    keys = ("forward_ms", "decode_ms_per_token", "forward_cpu_ms", "decode_cpu_ms_per_token")
    for mode in modes:
        row = {"mode": mode}
        for key in keys:
            row[key] = round(harness.median(r[key] for r in results[mode]), 3)
        # ratios to the base measured in the same process, then the median over the repetitions
        row.update(forward_ratio=_median_ratio(results[mode], "forward_ms"),
                   decode_ratio=_median_ratio(results[mode], "decode_ms_per_token"),
                   forward_cpu_ratio=_median_ratio(results[mode], "forward_cpu_ms"),
                   decode_cpu_ratio=_median_ratio(results[mode], "decode_cpu_ms_per_token"),
                   load_average=harness.median(r["load_before"] for r in results[mode]))
        rows.append(row)
    report = {"benchmark": "infer", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": harness.machine(probes),
              "workload": {k: getattr(args, k) for k in ("model", "dtype", "r", "adapters", "batch", "seq",
                                                          "prompt_tokens", "new_tokens", "iterations", "repeats",
                                                          "quick")},
              "measures": {"forward": "ms per forward over batch x seq tokens",
                           "decode": "ms per generated token (greedy generate(), KV cache, divided by new tokens)"},
              "rows": rows,
              "ratios_to_base": {r["mode"]: {"forward": r["forward_ratio"], "decode": r["decode_ratio"],
                                             "forward_cpu": r["forward_cpu_ratio"], "decode_cpu": r["decode_cpu_ratio"]}
                                 for r in rows}}
    print()
    print(harness.table(["mode", "forward ms", "x base", "(CPU)", "decode ms/token", "x base", "(CPU)", "load"],
                        [[r["mode"], r["forward_ms"], r["forward_ratio"], r["forward_cpu_ratio"],
                          r["decode_ms_per_token"], r["decode_ratio"], r["decode_cpu_ratio"], r["load_average"]]
                         for r in rows]))
    print(harness.probe_report_line(report["machine"]["probe"]))
    harness.write_json(args.json, report)
    return 0


def _median_ratio(measured: list[dict], key: str) -> float:
    return round(harness.median(r[f"{key}_ratio"] for r in measured), 3)
