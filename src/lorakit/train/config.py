"""The run configuration: a short YAML file mapped onto dataclasses, plus `key=value` overrides.

    model: smollm2                 # embedded alias, local directory or Hub id
    task_type: CAUSAL_LM
    finetuning_type: adapter       # adapter (or lora) | full | freeze
    quantization: nf4              # optional: linear weights in 4-bit NF4, the adapter trains on top (QLoRA)
    adapter: {method: lora, r: 8, lora_alpha: 16, target_modules: all-linear}
    data: {path: data/train.jsonl, val_size: 0.1, cutoff_len: 512}
    train: {learning_rate: 2.0e-4, num_epochs: 3, batch_size: 8}
    eval: {max_new_tokens: 64}
    output_dir: runs/my-run

Unknown keys fail with a "did you mean" suggestion; `lorakit train run.yaml train.learning_rate=1e-4`
overrides one value (parsed as YAML, so numbers, booleans, lists work).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from lorakit.config import PeftConfig, check_choice, check_positive, check_range, suggest
from lorakit.methods.quant import check_quantization, resolve_compute_dtype
from lorakit.registry import get_method
from lorakit.tasks import TRAINABLE_TASK_TYPES
from lorakit.text_files import read_text
from lorakit.train.data import DataConfig
from lorakit.train.precision import check_bf16_option
from lorakit.train.threads import check_threads_option

# adapter: train the adapter described by `adapter:` (any method); "lora" is the same (kept from before
# methods other than LoRA existed). full: every weight. freeze: the last train.freeze_trainable_layers blocks.
FINETUNING_TYPES = ("adapter", "lora", "full", "freeze")
ADAPTER_FINETUNING_TYPES = ("adapter", "lora")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainArgs:
    # Peak learning rate of AdamW.
    learning_rate: float = 2e-4
    # AdamW weight decay (not applied to biases and norm weights).
    weight_decay: float = 0.0
    # AdamW betas and epsilon.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # LoRA+: learning rate of the B matrices = ratio * learning_rate (2..16 in the paper); None = off.
    loraplus_lr_ratio: float | None = None
    # LoRA-FA: keep LoRA's A matrices frozen at their random init and train only B (half the trainable
    # parameters; the backward keeps A x, r values per token, instead of x).
    lora_fa: bool = False
    # Learning-rate schedule after warm-up: cosine, linear (both decay to 0) or constant.
    lr_scheduler: str = "cosine"
    # Linear warm-up steps; or warmup_ratio of the total steps when warmup_steps is 0.
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    # Passes over the training data (ignored when max_steps is set).
    num_epochs: float = 1.0
    # Stop after this many optimizer steps (overrides num_epochs).
    max_steps: int | None = None
    # Examples per micro-batch on each process.
    batch_size: int = 8
    # Micro-batches accumulated per optimizer step; global batch = batch_size * this * processes.
    gradient_accumulation_steps: int = 1
    # Clip the gradient norm to this value; 0 = no clipping.
    max_grad_norm: float = 1.0
    # bfloat16 compute with fp32 master weights: auto (the default: bf16 where bf16 matmuls are fast, CUDA and
    # CPUs with AVX512-BF16 or AMX; fp32 elsewhere), true, or false (fp32 throughout, the exact path). Adapter runs
    # store the frozen weights in bf16 while training (PiSSA/OLoRA residuals computed in fp32 first) and give them
    # their loaded dtype back at the end; trained weights and the optimizer state stay fp32
    # (lorakit/train/precision.py).
    bf16: bool | str = "auto"
    # Recompute activations in the backward pass to save memory.
    gradient_checkpointing: bool = False
    # Run RMSNorm and SwiGLU MLPs on fused kernels that keep half the activations for the backward, and Llama
    # attention's rotary embedding in one pass (forward outputs equal bit for bit; lorakit/ops/fused_modules.py).
    # false: the modules' own forwards.
    fused_modules: bool = True
    # Runs on the CPU (bf16 and fp32): causal self-attention on lorakit's kernel, faster than PyTorch's CPU flash
    # attention (built on first use with the system's C++ compiler; padded and packed batches too; SDPA where it
    # cannot be built and for other masks; lorakit/ops/attention.py). false: PyTorch's SDPA throughout.
    cpu_attention: bool = True
    # CPU threads per process: auto (PyTorch's choice: OMP_NUM_THREADS, else the cores; under torchrun on the CPU,
    # whose default is 1 thread per process, the node's cores divided among its processes) or a number
    # (lorakit/train/threads.py).
    threads: int | str = "auto"
    # Seed of initialisation, data order and dropout: the same seed gives the same run.
    seed: int = 42
    # Log every N steps; evaluate the validation loss every N steps (0 = only at the end).
    logging_steps: int = 10
    eval_steps: int = 0
    # Save a checkpoint every N steps (0 = only the final adapter); keep the newest save_total_limit.
    save_steps: int = 0
    save_total_limit: int | None = 2
    # Continue from a checkpoint directory, or "latest" for the newest checkpoint in output_dir.
    resume_from_checkpoint: str | None = None
    # Last N transformer blocks trained when finetuning_type is "freeze".
    freeze_trainable_layers: int = 2
    # Distributed strategy under torchrun: ddp (replicas) or fsdp (sharded base model).
    distributed: str = "ddp"
    # ---- trainer strategies (docs/trainer-strategies.md); each is off unless its first option is set ----
    # ReLoRA (arXiv:2307.05695), adapter runs: every relora_steps steps merge the adapter into the base
    # weights, re-initialise it, prune its optimizer state and restart the learning rate.
    relora_steps: int | None = None
    # Steps of linear learning-rate warm-up after each restart (the jagged schedule); None = 5% of relora_steps.
    relora_warmup_steps: int | None = None
    # Share of the adapter's Adam moments zeroed at a restart, smallest magnitudes first (1.0 = full reset).
    relora_prune_ratio: float = 0.999
    # LISA (arXiv:2403.17919), finetuning_type full: train this many randomly drawn transformer blocks (and
    # everything outside the blocks: embeddings, head) and draw again every lisa_interval_steps steps.
    lisa_activated_layers: int | None = None
    lisa_interval_steps: int = 20
    # Delta-LoRA (arXiv:2309.02411), adapter runs: after each optimizer step from delta_lora_start_step on,
    # also move the base weight by delta_lora_lambda * (new - old adapter update).
    delta_lora_lambda: float | None = None
    delta_lora_start_step: int = 0
    # LoRA-drop (arXiv:2402.07721), adapter runs: train lora_drop_warmup_steps steps on a lora_drop_sample_ratio
    # sample, measure each block's adapter output, keep own adapters for the blocks holding lora_drop_threshold
    # of the total, let the other blocks share one, then train that adapter from its initialisation.
    lora_drop_threshold: float | None = None
    lora_drop_warmup_steps: int = 10
    lora_drop_sample_ratio: float = 0.1

    def __post_init__(self) -> None:
        owner = "train"
        for name in ("learning_rate", "adam_epsilon", "num_epochs"):
            check_positive(owner, name, getattr(self, name))
        for name in ("batch_size", "gradient_accumulation_steps", "freeze_trainable_layers"):
            check_positive(owner, name, getattr(self, name), integer=True)
        for name in ("weight_decay", "max_grad_norm"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{owner}.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{owner}.{name} must be an integer >= 0, got {value!r}")
        check_range(owner, "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range(owner, "adam_beta1", self.adam_beta1, 0.0, 1.0)
        check_range(owner, "adam_beta2", self.adam_beta2, 0.0, 1.0)
        check_choice(owner, "lr_scheduler", self.lr_scheduler, SCHEDULERS)
        check_choice(owner, "distributed", self.distributed, ("ddp", "fsdp"))
        for name in ("max_steps", "save_total_limit"):
            if getattr(self, name) is not None:
                check_positive(owner, name, getattr(self, name), integer=True)
        if self.loraplus_lr_ratio is not None:
            check_positive(owner, "loraplus_lr_ratio", self.loraplus_lr_ratio)
        check_bf16_option(self.bf16)
        check_threads_option(self.threads)
        if not isinstance(self.lora_fa, bool):
            raise ValueError(f"{owner}.lora_fa must be true or false, got {self.lora_fa!r}")

    def method_options_set(self) -> list[str]:
        """The options of METHOD_OPTIONS this run sets (away from their defaults)."""
        return [name for name in METHOD_OPTIONS if getattr(self, name) not in (None, False)]


# Options of `train:` that only some adapter methods read (each method lists those it reads in
# Tuner.train_options); a run setting one its method ignores is refused rather than silently changed.
METHOD_OPTIONS = ("loraplus_lr_ratio", "lora_fa")


@dataclass(frozen=True)
class EvalArgs:
    # Score answers generated on the validation split (ROUGE, exact match) at the end of training.
    generate: bool = True
    # Generate for at most this many validation examples (0 = all).
    max_samples: int = 64
    # Generation options: length, batch size, greedy unless do_sample.
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "temperature", "top_p"):
            check_positive("eval", name, getattr(self, name), integer=name in ("max_new_tokens", "batch_size"))
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 0:
            raise ValueError(f"eval.max_samples must be an integer >= 0, got {self.max_samples!r}")


@dataclass(frozen=True)
class RunConfig:
    # Training data (see DataConfig).
    data: DataConfig
    # Where the run writes checkpoints, the adapter, metrics and plots.
    output_dir: str
    # Base model: "smollm2" or "minilm" (embedded), a local transformers directory, or a Hub id.
    model: str = "smollm2"
    # CAUSAL_LM (generation) or SEQ_CLS (classification on text_label data).
    task_type: str = "CAUSAL_LM"
    # adapter (or lora: the same) trains the adapter below; full every weight; freeze only the last
    # train.freeze_trainable_layers blocks.
    finetuning_type: str = "adapter"
    # Model dtype: float32 (default), bfloat16, float16, auto (as saved).
    dtype: str | None = None
    # Store the linear weights (all but the output head) quantized: nf4 (QLoRA's 4-bit NormalFloat), or
    # unset for a dense model. Only with an adapter: 4-bit weights cannot be trained.
    quantization: str | None = None
    # NF4: quantize the per-block scales to 8 bits too (4.127 instead of 4.5 bits per weight).
    double_quant: bool = True
    # NF4: dtype of the dequantized weights and their matmuls: bfloat16 (default), float32, float16.
    compute_dtype: str | None = None
    # The adapter: `method` (lora, vera, ...) plus that method's config fields, with PEFT's names
    # (e.g. {method: lora, r: 8, use_dora: true}).
    adapter: PeftConfig | None = None
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    def __post_init__(self) -> None:
        check_choice("config", "finetuning_type", self.finetuning_type, FINETUNING_TYPES)
        check_choice("config", "task_type", self.task_type, TRAINABLE_TASK_TYPES)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"config.output_dir must be a directory path, got {self.output_dir!r}")
        if self.train.distributed == "fsdp" and not self.uses_adapter:
            raise ValueError("config: train.distributed=fsdp shards a frozen base model and trains an adapter; "
                             f"use finetuning_type adapter (got {self.finetuning_type!r}) or train.distributed=ddp")
        self._check_quantization()
        if self.uses_adapter and self.adapter is None:
            raise ValueError(f"config.adapter is required when finetuning_type is {self.finetuning_type}, e.g. "
                             "adapter: {method: lora, r: 8, target_modules: all-linear}")
        method = get_method(self.adapter.peft_type) if self.uses_adapter else None
        for name in self.train.method_options_set():
            if method is None or name not in method.train_options:
                what = f"the {method.name} method" if method else f"finetuning_type {self.finetuning_type}"
                raise ValueError(f"config: train.{name}={getattr(self.train, name)!r} does not apply to {what}; "
                                 f"remove it")
        from lorakit.train.strategies import check_strategies  # here: the strategies import this module

        check_strategies(self)

    def _check_quantization(self) -> None:
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"config.double_quant must be true or false, got {self.double_quant!r}")
        if self.quantization is None:
            if self.compute_dtype is not None:
                raise ValueError(f"config.compute_dtype={self.compute_dtype!r} only applies to a quantized model; set "
                                 "quantization: nf4 or remove compute_dtype")
            return
        check_quantization(self.quantization, "config.quantization")
        resolve_compute_dtype(self.compute_dtype, "config.compute_dtype")
        if not self.uses_adapter:
            raise ValueError(f"config.quantization={self.quantization!r} cannot be used with finetuning_type "
                             f"{self.finetuning_type!r}: quantized weights are frozen and cannot be trained. Train an "
                             "adapter on top (finetuning_type: adapter), or remove quantization")

    @property
    def quantization_kwargs(self) -> dict:
        """The quantization options as load_model_and_tokenizer / quantize_model take them ({} when dense)."""
        if self.quantization is None:
            return {}
        return {"quantization": self.quantization, "double_quant": self.double_quant,
                "compute_dtype": self.compute_dtype}

    @property
    def uses_adapter(self) -> bool:
        """True when the run trains an adapter (finetuning_type adapter or lora), not the model's own weights."""
        return self.finetuning_type in ADAPTER_FINETUNING_TYPES

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["data"] = dataclasses.asdict(self.data)
        out["train"] = dataclasses.asdict(self.train)
        out["eval"] = dataclasses.asdict(self.eval)
        if self.adapter is not None:
            adapter = self.adapter.to_dict()
            adapter["method"] = adapter.pop("peft_type").lower()
            out["adapter"] = {k: v for k, v in adapter.items() if k not in ("base_model_name_or_path",
                                                                            "inference_mode")}
        return out


SECTIONS = {"data": DataConfig, "train": TrainArgs, "eval": EvalArgs}


def load_run_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML run config (or start from `base`), apply `key=value` overrides, validate."""
    raw = copy.deepcopy(base or {})  # overrides write into nested sections: never into the caller's dicts
    if path is not None:
        raw.update(read_yaml(path))
    if isinstance(raw.get("data"), str):  # `data: file.jsonl` shorthand, expanded so `data.x=...` overrides apply
        raw["data"] = {"path": raw["data"]}
    for item in overrides:
        apply_override(raw, item)
    return build_run_config(raw, source=path or "config")


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    text = read_text(path, "run configs")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings (model:, data:, train:, ...)")
    return data


def apply_override(raw: dict, item: str, what: str = "override") -> None:
    """`train.learning_rate=1e-4` -> raw["train"]["learning_rate"] = 1e-4 (value parsed as YAML).
    `what` names the item in messages (e.g. "--option" for inspect)."""
    if "=" not in item:
        raise ValueError(f"{what} {item!r} must look like key=value, e.g. train.learning_rate=1e-4")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} {item!r}: the value {text!r} is not valid YAML ({problem}). Close its brackets "
                         "and quotes (a list: key=[a, b]), or put the value in quotes to pass it as text") from None
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{what} {item!r}: {part!r} is not a section")
    node[leaf] = value


def build_run_config(raw: dict, source: str = "config") -> RunConfig:
    raw = dict(raw)
    top_fields = {f.name for f in dataclasses.fields(RunConfig)}
    _check_keys(raw, top_fields, source)
    if isinstance(raw.get("data"), str):
        raw["data"] = {"path": raw["data"]}
    kwargs = {}
    for name, cls in SECTIONS.items():
        section = raw.pop(name, None) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: {name} must be a mapping of settings, got {section!r}")
        _check_keys(section, {f.name for f in dataclasses.fields(cls)}, f"{source}: {name}")
        if name == "data" and section.get("path") is None:
            state = "is null" if "path" in section else "is required"
            raise ValueError(f"{source}: data.path {state}; give the training data file or folder")
        kwargs[name] = _build(cls, section, f"{source}: {name}")
    kwargs["adapter"] = build_adapter_config(raw.pop("adapter", None), raw.get("task_type", "CAUSAL_LM"), source)
    if "output_dir" not in raw:
        raise ValueError(f"{source}: output_dir is required (where the run writes its results)")
    return _build(RunConfig, {**raw, **kwargs}, source)


def build_adapter_config(section, task_type: str, source: str) -> PeftConfig | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"{source}: adapter must be a mapping such as {{method: lora, r: 8}}, got {section!r}")
    section = dict(section)
    method = get_method(section.pop("method", "lora"))
    known = {f.name for f in dataclasses.fields(method.config_cls)}
    _check_keys(section, known, f"{source}: adapter ({method.name})")
    section.setdefault("task_type", task_type)
    return _build(method.config_cls, section, f"{source}: adapter")


def _build(cls, kwargs: dict, where: str):
    kwargs = {k: _coerce_number(cls, k, v) for k, v in kwargs.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _coerce_number(cls, name: str, value):
    """YAML reads `2e-4` (no dot) as a string; turn such strings into floats for float fields."""
    annotation = str(next((f.type for f in dataclasses.fields(cls) if f.name == name), ""))
    if isinstance(value, str) and "float" in annotation:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_keys(section: dict, known: set[str], where: str) -> None:
    for key in section:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}{suggest(key, known)}; valid keys: "
                             f"{', '.join(sorted(known))}")
