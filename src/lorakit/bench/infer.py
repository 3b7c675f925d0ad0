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
adapter i % N: `adapter_names=`), and peft-unmerged / peft-mixed for reference (--no-peft to skip). Every mode
runs in a fresh process, the modes take turns, medians of --repeats runs. Targets (docs/performance.md): merged
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
    import torch

    model, adapter_names = _build(spec)
    extra = {"adapter_names": adapter_names} if adapter_names else {}
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=generator)
    prompt = ids[:, :spec["prompt_tokens"]]
    settings = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False,
                    pad_token_id=0, attention_mask=torch.ones_like(prompt))
    wall: dict[str, list[float]] = {"forward": [], "decode": []}
    cpu: dict[str, list[float]] = {"forward": [], "decode": []}

    def timed(kind: str, per: int, call) -> None:
        started, started_cpu = time.perf_counter(), time.process_time()
        call()
        wall[kind].append(1000 * (time.perf_counter() - started) / per)
        cpu[kind].append(1000 * (time.process_time() - started_cpu) / per)

    with torch.no_grad():
        model(input_ids=ids, **extra)  # warm-up
        model.generate(input_ids=prompt, **settings, **extra)
        for _ in range(spec["iterations"]):
            timed("forward", 1, lambda: model(input_ids=ids, **extra))
            timed("decode", spec["new_tokens"], lambda: model.generate(input_ids=prompt, **settings, **extra))
    return {"forward_ms": harness.median(wall["forward"]), "decode_ms_per_token": harness.median(wall["decode"]),
            "forward_cpu_ms": harness.median(cpu["forward"]), "decode_cpu_ms_per_token": harness.median(cpu["decode"]),
            "threads": torch.get_num_threads()}


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
    for repeat in range(args.repeats):
        for mode in (modes if repeat % 2 == 0 else list(reversed(modes))):
            spec = {"kind": "infer", "mode": mode, "library": "peft" if mode.startswith("peft") else "lorakit",
                    "model": args.model, "dtype": args.dtype, "r": args.r, "adapters": args.adapters,
                    "batch": args.batch, "seq": args.seq, "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens, "iterations": args.iterations, "seed": args.seed,
                    "threads": args.threads}
            result = harness.run_worker(spec)
            results[mode].append(result)
            print(f"  run {repeat + 1}: {mode:14} forward {result['forward_ms']:8.1f} ms   decode "
                  f"{result['decode_ms_per_token']:7.2f} ms/token  (load {result['load_before']:.1f})", flush=True)
    rows = []
    keys = ("forward_ms", "decode_ms_per_token", "forward_cpu_ms", "decode_cpu_ms_per_token")
    base = {k: harness.median(r[k] for r in results["base"]) for k in keys}
    for mode in modes:
        row = {"mode": mode}
        for key in keys:
            row[key] = round(harness.median(r[key] for r in results[mode]), 3)
        row.update(forward_ratio=round(row["forward_ms"] / base["forward_ms"], 3),
                   decode_ratio=round(row["decode_ms_per_token"] / base["decode_ms_per_token"], 3),
                   # CPU time of this process: steadier than the wall clock on a shared machine
                   forward_cpu_ratio=round(row["forward_cpu_ms"] / base["forward_cpu_ms"], 3),
                   decode_cpu_ratio=round(row["decode_cpu_ms_per_token"] / base["decode_cpu_ms_per_token"], 3),
                   load_average=harness.median(r["load_before"] for r in results[mode]))
        rows.append(row)
    report = {"benchmark": "infer", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": harness.machine(),
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
    harness.write_json(args.json, report)
    return 0
