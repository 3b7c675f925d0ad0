"""Fine-tune the embedded SmolLM2-135M-Instruct with LoRA on lorakit's demo task and compare it with the
base model, offline, in a few minutes on a CPU.

The task (src/lorakit/data/demo/README.md): turn a spoken smart-home request into a one-line record,
"Could you set the heating in the study to 17 degrees at 15.05" ->
"device=heating room=office action=set value=17 time=15:05". The base model answers in prose.

Prints base vs LoRA on the held-out split (ROUGE-L, exact match), the trainable parameters, training
time, peak memory and a sample before/after; writes the adapter, metrics.jsonl, loss_curve.png,
run_config.yaml (re-run it with `lorakit train`) and results.json into the output directory.

Any other method runs the same demo through `key=value` overrides of the run config (as `lorakit train`):

    lorakit demo adapter.use_dora=true                 # DoRA
    lorakit demo adapter.init_lora_weights=pissa       # PiSSA
    lorakit demo adapter.method=vera adapter.r=256     # VeRA (starts from {method: vera, target_modules: all-linear})
    lorakit demo --quantization nf4                    # QLoRA
    lorakit demo finetuning_type=full train.learning_rate=1e-4   # full fine-tuning, for comparison
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources

from lorakit.cli.train import format_seconds

DEMO_SYSTEM = "Parse the smart-home command."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.methods.quant import QUANTIZERS  # here, not at module level: importing a command stays cheap

    parser.add_argument("--output-dir", metavar="DIR",
                        help="where to write the run (default: runs/demo-<date>-<time>, never an existing run)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    parser.add_argument("--model", default="smollm2",
                        help="base model (default: the embedded smollm2; the demo data is sized for it)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 even where it is slow (by default, train.bf16=auto, the demo trains in bf16 where "
                             "bf16 matmuls are fast: CUDA, CPUs with AVX512-BF16/AMX; train.bf16=false: fp32)")
    parser.add_argument("--quantization", choices=tuple(QUANTIZERS), default=None,
                        help="QLoRA: store the base model's linear weights in 4-bit NF4 (bf16 compute)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the adapter init and data order")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="change the demo's run config, as for `lorakit train`: adapter.use_dora=true, "
                             "adapter.method=vera, train.lora_fa=true, finetuning_type=full ...")


def demo_config(args: argparse.Namespace, output_dir: str):
    """The demo run: LoRA r=8 on every linear layer, one epoch at lr 2e-3 (sized in
    src/lorakit/data/demo/README.md); the held-out test split is the validation set. `args.overrides`
    (key=value) change it as they change a `lorakit train` config; `adapter.method=X` starts the adapter section
    afresh from {method: X, target_modules: all-linear}, since LoRA's fields mean nothing to other methods."""
    from lorakit.train.config import apply_override, build_run_config

    demo_dir = resources.files("lorakit") / "data" / "demo"
    raw = {
        "model": args.model, "output_dir": output_dir, "task_type": "CAUSAL_LM", "finetuning_type": "adapter",
        "quantization": getattr(args, "quantization", None),
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(demo_dir / "train.jsonl"), "val_path": str(demo_dir / "test.jsonl"), "cutoff_len": 128},
        "train": {"learning_rate": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 4, "num_epochs": 1,
                  "batch_size": 8, "seed": args.seed, "logging_steps": 4,
                  **({"bf16": True} if getattr(args, "bf16", False) else {})},  # else train.bf16's default
        # answers are <= 24 tokens; all 48 test prompts in one batch
        "eval": {"generate": False, "max_samples": 0, "max_new_tokens": 32, "batch_size": 48},
    }
    overrides = list(getattr(args, "overrides", []) or [])
    method = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "adapter.method"]
    if method and method[-1].lower() != "lora":
        raw["adapter"] = {"method": method[-1], "target_modules": "all-linear"}
    for item in overrides:
        apply_override(raw, item)
    if raw.get("finetuning_type") in ("full", "freeze"):
        raw.pop("adapter", None)
    return build_run_config(raw, source="demo")


def method_label(cfg) -> str:
    """How the demo names what it trained: "LoRA", "LoRA (DoRA)", "VeRA", "full fine-tuning", ..."""
    if not cfg.uses_adapter:
        return f"{cfg.finetuning_type} fine-tuning"
    from lorakit.registry import get_method

    method = get_method(cfg.adapter.peft_type)
    label = method.display_name or method.name
    variants = [name for name, on in (("DoRA", getattr(cfg.adapter, "use_dora", False)),
                                      ("rsLoRA", getattr(cfg.adapter, "use_rslora", False))) if on]
    init = getattr(cfg.adapter, "init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":
        variants.append(init.split("_")[0].upper().replace("PISSA", "PiSSA").replace("OLORA", "OLoRA"))
    if getattr(cfg.train, "lora_fa", False):
        variants.append("LoRA-FA")
    if cfg.quantization:
        label = f"Q{label}" if label == "LoRA" else f"{label} on {cfg.quantization.upper()}"
    return f"{label} ({', '.join(variants)})" if variants else label


def run(args: argparse.Namespace) -> int:
    from lorakit.models.loading import load_model_and_tokenizer
    from lorakit.train.evaluate import answer_metrics, validation_answers
    from lorakit.train.loop import run_training
    from lorakit.train.run_log import peak_rss_mb
    from lorakit.train.output_dir import check_output_dir
    from lorakit.train.runtime import allocator_name

    started = time.time()
    output_dir = args.output_dir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    cfg = demo_config(args, output_dir)
    check_output_dir(cfg, args.overwrite)  # before minutes of work, not after
    model_label = f"{args.model} in {cfg.quantization.upper()}" if cfg.quantization else args.model
    label = method_label(cfg)
    print(f"lorakit demo: {label} on {model_label}, output in {output_dir} (malloc: {allocator_name()})", flush=True)
    model, tokenizer = load_model_and_tokenizer(cfg.model, "CAUSAL_LM", dtype=cfg.dtype, **cfg.quantization_kwargs)
    print(f"[{format_seconds(time.time() - started)}] model loaded; scoring the base model on the "
          "48 held-out requests", flush=True)
    prompts, base_answers, references = validation_answers(model, tokenizer, cfg)
    base = answer_metrics(base_answers, references)
    print(f"[{format_seconds(time.time() - started)}] base ROUGE-L {base['rougeL']:.3f}, exact match "
          f"{base['exact_match']:.3f}; training {label} (1 epoch)", flush=True)

    result = run_training(cfg, overwrite=args.overwrite, loaded=(model, tokenizer),
                          show_progress=not args.no_progress)
    if result.interrupted:
        print(f"interrupted; checkpoint in {output_dir}")
        return 130
    _, tuned_answers, _ = validation_answers(result.model, tokenizer, cfg)
    tuned = answer_metrics(tuned_answers, references)
    results = {
        "method": label,
        "base": {"rougeL": base["rougeL"], "exact_match": base["exact_match"]},
        "tuned": {"rougeL": tuned["rougeL"], "exact_match": tuned["exact_match"]},
        "trainable_params": result.trainable_params,
        "trainable_percent": result.trainable_percent,
        "train_seconds": result.train_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    print_report(results, prompts, base_answers, tuned_answers, references, output_dir, time.time() - started)
    return 0


def print_report(results, prompts, base_answers, tuned_answers, references, output_dir, elapsed) -> None:
    base, tuned, label = results["base"], results["tuned"], results["method"]
    width = max(10, len(label) + 2)
    print()
    print(f"{'held-out split (48)':<22}{'base':>10}{label:>{width}}")
    print(f"{'ROUGE-L':<22}{base['rougeL']:>10.3f}{tuned['rougeL']:>{width}.3f}")
    print(f"{'exact match':<22}{base['exact_match']:>10.3f}{tuned['exact_match']:>{width}.3f}")
    print()
    print(f"trainable params   {results['trainable_params']:,d} ({results['trainable_percent']:.2f}% of the model)")
    print(f"training time      {format_seconds(results['train_seconds'])}")
    print(f"peak memory (RSS)  {results['peak_rss_mb']:.0f} MiB")
    print(f"whole demo         {format_seconds(elapsed)}")
    print()
    request = prompts[0].rsplit("user\n", 1)[-1].split("<|im_end|>")[0].strip()
    print(f"request    {request}")
    print(f"expected   {references[0]}")
    print(f"base       {_one_line(base_answers[0])}")
    print(f"{'tuned':<11}{tuned_answers[0]}")
    print()
    print(f"adapter, loss curve, metrics and results.json in {output_dir}/")


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."
