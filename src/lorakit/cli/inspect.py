"""Show a model's modules, the modules an adapter could target, and what an adapter config would train.

    lorakit inspect --model smollm2
    lorakit inspect --model smollm2 --target-modules all-linear --r 8
    lorakit inspect --model smollm2 --target-modules q_proj v_proj --r 16 --option use_rslora=true
    lorakit inspect --config run.yaml                    # model, task_type and adapter from a run config
    lorakit inspect --model smollm2 --quantization nf4   # with the linear weights in NF4: their memory

Prints the module tree (runs of identical blocks collapsed, e.g. "layers.0-29"), the target candidates
(short names with type, shape and count, to use in target_modules), and for an adapter config: the
modules it wraps and the trainable parameters (as print_trainable_parameters shows them).
--target-modules takes names or dotted suffixes (q_proj, self_attn.q_proj), "all-linear", or one regex
over full module names (recognised by a regex character: * + ? [ ] ( ) | ^ $ \\).
"""

from __future__ import annotations

import argparse

from lorakit.cli.module_tree import candidate_rows, count_by_short_name, format_columns, tree_lines

MAIN_FIELDS = ("r", "lora_alpha", "target_modules")  # always shown when the method has them
REGEX_CHARACTERS = set("*+?[](){}|^$\\")
# options copied as they are into the adapter config (argparse dest = config field)
ADAPTER_FIELDS = ("r", "lora_alpha", "exclude_modules", "modules_to_save", "layers_to_transform")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.methods.quant import QUANTIZERS  # here, not at module level: importing a command stays cheap

    parser.add_argument("--model", metavar="M", help="embedded alias (smollm2, minilm), model directory or Hub id")
    parser.add_argument("--config", metavar="FILE", help="a run config (YAML): model, task_type and adapter")
    parser.add_argument("--task-type", choices=("CAUSAL_LM", "SEQ_CLS"), default=None,
                        help="model head to load (default CAUSAL_LM, or the config's)")
    parser.add_argument("--quantization", choices=tuple(QUANTIZERS), default=None,
                        help="load the linear weights quantized (default: dense, or the config's quantization)")
    parser.add_argument("--no-tree", action="store_true", help="leave out the module tree")
    adapter = parser.add_argument_group("adapter (instead of --config)")
    adapter.add_argument("--method", default=None, help="adapter method (default lora)")
    adapter.add_argument("--target-modules", nargs="+", metavar="NAME", help="modules to wrap (see above)")
    adapter.add_argument("--r", type=int, metavar="N", help="LoRA rank")
    adapter.add_argument("--lora-alpha", type=float, metavar="X", help="LoRA scale numerator")
    adapter.add_argument("--exclude-modules", nargs="+", metavar="NAME", help="modules never wrapped")
    adapter.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="modules trained in full")
    adapter.add_argument("--layers-to-transform", nargs="+", type=int, metavar="I", help="only these block indices")
    adapter.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="any other field of the method's config (YAML value), e.g. use_rslora=true")


def run(args: argparse.Namespace) -> int:
    from lorakit.methods.quant import quantization_summary
    from lorakit.models import load_model_and_tokenizer
    from lorakit.registry import get_method

    model_name, task_type, adapter_cfg, run_cfg, label_names = resolve_inputs(args)
    quantization = {"quantization": args.quantization} if args.quantization else \
        (run_cfg.quantization_kwargs if run_cfg is not None else {})
    model, _ = load_model_and_tokenizer(model_name, task_type, label_names=label_names, **quantization)
    method = get_method(adapter_cfg.peft_type if adapter_cfg is not None else (args.method or "lora"))
    if adapter_cfg is not None and (run_cfg is None or run_cfg.uses_adapter):
        from lorakit.inject import find_targets

        find_targets(model, adapter_cfg, method)  # a config that matches nothing fails before any output
    lines = [] if args.no_tree else ["module tree:", *("  " + line for line in tree_lines(model)), ""]
    header = ["name", "type", "shape", "count", "example", "note"]
    rows = candidate_rows(model, tuple(method.layers), task_type)
    lines += [f"target candidates for {method.name} (target_modules takes the names or dotted suffixes):",
              *format_columns(header, rows), ""]
    summary = quantization_summary(model)
    if summary:
        lines += [f"quantized: {summary}", ""]
    print("\n".join(lines))
    if run_cfg is not None and not run_cfg.uses_adapter:
        report_finetuning(model, run_cfg)
    elif adapter_cfg is not None:
        report_adapter(model, adapter_cfg)
    return 0


def resolve_inputs(args: argparse.Namespace):
    """(model name, task type, adapter config or None, run config or None, label names or None)."""
    from lorakit.train.config import apply_override, build_adapter_config, load_run_config

    given = [name for name in (*ADAPTER_FIELDS, "target_modules", "method")
             if getattr(args, name) is not None] + (["option"] if args.option else [])
    if args.config:
        if given:
            raise ValueError(f"give either --config or adapter options (--{given[0].replace('_', '-')}), not both")
        cfg = load_run_config(args.config)
        task_type = args.task_type or cfg.task_type
        return args.model or cfg.model, task_type, cfg.adapter, cfg, _label_names(cfg, task_type)
    if not args.model:
        raise ValueError("--model (or --config) is required, e.g. --model smollm2")
    task_type = args.task_type or "CAUSAL_LM"
    if not given:
        return args.model, task_type, None, None, None
    section = {"method": args.method or "lora"}
    section.update({name: getattr(args, name) for name in ADAPTER_FIELDS if getattr(args, name) is not None})
    if args.target_modules is not None:
        section["target_modules"] = target_spec(args.target_modules)
    for item in args.option:
        apply_override(section, item, "--option")
    return args.model, task_type, build_adapter_config(section, task_type, "inspect"), None, None


def target_spec(values: list[str]) -> str | list[str]:
    """One value that is "all-linear" or a regex stays a string; names become a list (suffix matching)."""
    if len(values) == 1 and (values[0].lower() == "all-linear" or REGEX_CHARACTERS & set(values[0])):
        return values[0]
    return list(values)


def _label_names(cfg, task_type: str):
    """The classifier's classes from the run's data, so the head (and the parameter count) is the trained one."""
    if task_type != "SEQ_CLS":
        return None
    from lorakit.train.data import load_splits

    try:
        return load_splits(cfg.data).label_names
    except FileNotFoundError:
        return None  # the checkpoint's own head size


def report_adapter(model, adapter_cfg) -> None:
    from lorakit.adapter_layer import AdapterLayer
    from lorakit.model import get_peft_model
    from lorakit.modules_to_save import ModulesToSaveWrapper
    from lorakit.state import adapter_holders

    peft_model = get_peft_model(model, adapter_cfg)
    holders = adapter_holders(peft_model.get_base_model())
    wrapped = [n for n, m in holders if isinstance(m, AdapterLayer)]
    copies = [n for n, m in holders if isinstance(m, ModulesToSaveWrapper)]
    print(f"adapter: {describe_config(adapter_cfg)}")
    print(f"wrapped modules: {len(wrapped)} ({count_by_short_name(wrapped)})")
    if copies:
        print(f"modules trained in full (modules_to_save): {len(copies)} ({count_by_short_name(copies)})")
    peft_model.print_trainable_parameters()


def report_finetuning(model, run_cfg) -> None:
    from lorakit.model import parameter_counts
    from lorakit.train.setup import prepare_model

    model = prepare_model(model, run_cfg)
    trainable, total = parameter_counts(model)
    print(f"finetuning_type: {run_cfg.finetuning_type}")
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def describe_config(config) -> str:
    """The method, its main fields, and every field that differs from its default,
    e.g. "lora r=8, lora_alpha=16, target_modules='all-linear'"."""
    defaults = type(config)().to_dict()
    skip = {"peft_type", "base_model_name_or_path", "inference_mode", "task_type"}
    fields = [f"{k}={v!r}" for k, v in config.to_dict().items()
              if k not in skip and (k in MAIN_FIELDS or v != defaults.get(k))]
    return f"{config.peft_type.lower()} " + ", ".join(fields)
