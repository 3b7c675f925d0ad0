"""Fine-tune the embedded SmolLM2-135M-Instruct with LoRA on lorakit's demo task and compare it with the
base model, offline, in a few minutes on a CPU.

The task (src/lorakit/data/demo/README.md): turn a spoken smart-home request into a one-line record,
"Could you set the heating in the study to 17 degrees at 15.05" ->
"device=heating room=office action=set value=17 time=15:05". The base model answers in prose.

Prints base vs LoRA on the held-out split (ROUGE-L, exact match), the trainable parameters, training
time, peak memory and a sample before/after; writes the adapter, metrics.jsonl, loss_curve.png,
run_config.yaml (re-run it with `lorakit train`) and results.json into the output directory.
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
                        help="bfloat16 autocast: about 2x faster on CPUs with native bf16, slower on others")
    parser.add_argument("--quantization", choices=tuple(QUANTIZERS), default=None,
                        help="QLoRA: store the base model's linear weights in 4-bit NF4 (bf16 compute)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the adapter init and data order")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bar")


def demo_config(args: argparse.Namespace, output_dir: str):
    """The demo run: LoRA r=8 on every linear layer, one epoch at lr 2e-3 (sized in
    src/lorakit/data/demo/README.md); the held-out test split is the validation set."""
    from lorakit.methods.lora import LoraConfig
    from lorakit.train.config import EvalArgs, RunConfig, TrainArgs
    from lorakit.train.data import DataConfig

    demo_dir = resources.files("lorakit") / "data" / "demo"
    return RunConfig(
        model=args.model, output_dir=output_dir, task_type="CAUSAL_LM", finetuning_type="adapter",
        quantization=getattr(args, "quantization", None),
        adapter=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        data=DataConfig(path=str(demo_dir / "train.jsonl"), val_path=str(demo_dir / "test.jsonl"), cutoff_len=128),
        train=TrainArgs(learning_rate=2e-3, lr_scheduler="cosine", warmup_steps=4, num_epochs=1, batch_size=8,
                        seed=args.seed, logging_steps=4, bf16=args.bf16),
        # answers are <= 24 tokens; all 48 test prompts in one batch
        eval=EvalArgs(generate=False, max_samples=0, max_new_tokens=32, batch_size=48),
    )


def run(args: argparse.Namespace) -> int:
    from lorakit.models.loading import load_model_and_tokenizer
    from lorakit.train.evaluate import answer_metrics, validation_answers
    from lorakit.train.loop import run_training
    from lorakit.train.run_log import peak_rss_mb
    from lorakit.train.output_dir import check_output_dir

    started = time.time()
    output_dir = args.output_dir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    cfg = demo_config(args, output_dir)
    check_output_dir(cfg, args.overwrite)  # before minutes of work, not after
    model_label = f"{args.model} in {cfg.quantization.upper()}" if cfg.quantization else args.model
    print(f"lorakit demo: LoRA on {model_label}, output in {output_dir}", flush=True)
    model, tokenizer = load_model_and_tokenizer(cfg.model, "CAUSAL_LM", dtype=cfg.dtype, **cfg.quantization_kwargs)
    print(f"[{format_seconds(time.time() - started)}] model loaded; scoring the base model on the "
          "48 held-out requests", flush=True)
    prompts, base_answers, references = validation_answers(model, tokenizer, cfg)
    base = answer_metrics(base_answers, references)
    print(f"[{format_seconds(time.time() - started)}] base ROUGE-L {base['rougeL']:.3f}, exact match "
          f"{base['exact_match']:.3f}; training LoRA (1 epoch)", flush=True)

    result = run_training(cfg, overwrite=args.overwrite, loaded=(model, tokenizer),
                          show_progress=not args.no_progress)
    if result.interrupted:
        print(f"interrupted; checkpoint in {output_dir}")
        return 130
    _, lora_answers, _ = validation_answers(result.model, tokenizer, cfg)
    lora = answer_metrics(lora_answers, references)
    results = {
        "base": {"rougeL": base["rougeL"], "exact_match": base["exact_match"]},
        "lora": {"rougeL": lora["rougeL"], "exact_match": lora["exact_match"]},
        "trainable_params": result.trainable_params,
        "trainable_percent": result.trainable_percent,
        "train_seconds": result.train_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    print_report(results, prompts, base_answers, lora_answers, references, output_dir, time.time() - started)
    return 0


def print_report(results, prompts, base_answers, lora_answers, references, output_dir, elapsed) -> None:
    base, lora = results["base"], results["lora"]
    print()
    print(f"{'held-out split (48)':<22}{'base':>10}{'LoRA':>10}")
    print(f"{'ROUGE-L':<22}{base['rougeL']:>10.3f}{lora['rougeL']:>10.3f}")
    print(f"{'exact match':<22}{base['exact_match']:>10.3f}{lora['exact_match']:>10.3f}")
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
    print(f"LoRA       {lora_answers[0]}")
    print()
    print(f"adapter, loss curve, metrics and results.json in {output_dir}/")


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."
