"""The benchmark workload: one LoRA training step (or one inference) on the embedded SmolLM2-135M, built the
same way for lorakit and for HuggingFace PEFT.

Training settings (both libraries unless noted):
  fp32      fp32 weights, fp32 compute (lorakit: the exact path)
  bf16      weights loaded in bf16, adapters fp32 (both libraries' default for a bf16 model), no autocast
  autocast  fp32 weights under torch.autocast(bf16)
  default   lorakit only: what `lorakit train` does with its default precision (train.bf16=auto: frozen weights
            in bf16 where bf16 is fast, fp32 adapters and optimizer, autocast; lorakit/train/precision.py), through
            the trainer's own apply_training_precision (train/setup.py)

One step = forward, loss, backward, AdamW step. The optimizer is PyTorch's fused AdamW for both libraries where
PyTorch has the kernel (the default of `lorakit train`, lorakit/train/optim.py, and of the transformers Trainer
since torch 2.8, `adamw_torch_fused`), the per-tensor loop elsewhere. PEFT's loss is the model's own (`labels=`
in the forward, as a PEFT user computes it); lorakit's is the trainer's (`summed_token_loss`, mean over tokens).
Both libraries start from the same adapter weights (`write_initial_adapter` makes them once; every measurement
loads them) and see the same random-token batches, so their loss curves are comparable step by step.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch

SETTINGS = ("fp32", "bf16", "autocast", "default")
LIBRARIES = ("lorakit", "peft")
# lora: plain LoRA; dora: use_dora=True; qlora: the base's linear weights in NF4 (lorakit only: PEFT needs
# bitsandbytes, whose 4-bit layers want a GPU)
VARIANTS = ("lora", "dora", "qlora")


def lora_options(r: int, alpha: int, variant: str = "lora") -> dict:
    return dict(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", use_dora=variant == "dora")


def load_base(model_name: str, dtype: str | None, variant: str = "lora", bf16_as_stored: bool = False):
    from lorakit.models.loading import load_model_and_tokenizer

    quantization = {"quantization": "nf4"} if variant == "qlora" else {}
    model, _ = load_model_and_tokenizer(model_name, dtype=dtype, device="cpu", bf16_as_stored=bf16_as_stored,
                                        **quantization)
    return model


def wrap(library: str, model, r: int, alpha: int, variant: str = "lora"):
    """The model with a LoRA adapter from `library`."""
    if library == "peft":
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(model, peft.LoraConfig(**lora_options(r, alpha, variant)))
    import lorakit

    return lorakit.get_peft_model(model, lorakit.LoraConfig(**lora_options(r, alpha, variant)))


def write_initial_adapter(path: str, model_name: str, r: int, alpha: int, seed: int, variant: str = "lora") -> None:
    """lorakit's initialisation for this seed, saved by parameter name (both libraries use PEFT's names)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = wrap("lorakit", load_base(model_name, None, variant), r, alpha, variant)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)


def _common_name(name: str) -> str:
    """A parameter name both libraries agree on: PEFT holds DoRA's magnitude in a module (`...default.weight`),
    lorakit in a ParameterDict (`...default`)."""
    return re.sub(r"(lora_magnitude_vector\.[^.]+)\.weight$", r"\1", name)


def load_initial_adapter(model, path: str) -> None:
    from safetensors.torch import load_file

    saved = {_common_name(n): t for n, t in load_file(path).items()}
    trainable = {_common_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(trainable):
        missing = sorted(set(saved) ^ set(trainable))[:3]
        raise RuntimeError(f"the initial adapter does not match the model's trainable parameters ({missing})")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])


def random_batch(step: int, batch: int, seq: int, vocab: int, seed: int) -> dict:
    """Random tokens, every position trained; the same for every library and setting."""
    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TrainingStep:
    """A model, its optimizer and a step function for one (library, setting)."""

    def __init__(self, library: str, setting: str, model_name: str, r: int, alpha: int, lr: float,
                 init_path: str | None, variant: str = "lora") -> None:
        if setting not in SETTINGS or (setting == "default" and library != "lorakit"):
            raise ValueError(f"no setting {setting!r} for {library}; settings: {SETTINGS} (default: lorakit only)")
        if variant not in VARIANTS or (variant == "qlora" and library != "lorakit"):
            raise ValueError(f"no variant {variant!r} for {library}; variants: {VARIANTS} (qlora: lorakit only)")
        self.library, self.setting, self.variant = library, setting, variant
        from lorakit.train.config import TrainArgs
        from lorakit.train.setup import loads_bf16_as_stored

        # the default setting loads as `lorakit train` does (train/setup.py, load_training_model)
        as_stored = setting == "default" and loads_bf16_as_stored(None, True, TrainArgs(), torch.device("cpu"))
        model = load_base(model_name, "bfloat16" if setting == "bf16" else None, variant, as_stored)
        self.model = wrap(library, model, r, alpha, variant).train()
        if init_path:
            load_initial_adapter(self.model, init_path)
        self.autocast = contextlib.nullcontext()
        if setting == "autocast":
            self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        elif setting == "default":  # the trainer's own precision step with its default options, whatever they are
            from lorakit.train import precision
            from lorakit.train.setup import apply_training_precision, stored_bf16_loaded_dtype

            bf16, _ = apply_training_precision(self.model, TrainArgs(), torch.device("cpu"),
                                               loaded_dtype=stored_bf16_loaded_dtype(model, as_stored))
            self.autocast = precision.autocast(torch.device("cpu"), bf16)
        if library == "lorakit" and setting != "default":
            # as `lorakit train` does (train.fused_modules and train.cpu_attention, both on by default)
            from lorakit.ops.attention import use_cpu_attention
            from lorakit.ops.fused_modules import use_fused_modules

            use_fused_modules(self.model)
            use_cpu_attention(self.model)
        from lorakit.train.optim import fused_adamw_runs

        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=lr, fused=fused_adamw_runs(trained))
        self.vocab = self.model.config.vocab_size

    def loss(self, batch: dict, on_keep=None) -> torch.Tensor:
        """The step's loss; `on_keep(tensor)` sees each tensor autograd keeps for the backward."""
        with self.autocast:
            if self.library == "peft":
                hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: on_keep(t) or t, lambda t: t) \
                    if on_keep else contextlib.nullcontext()
                with hooks:
                    return self.model(**batch).loss
            from lorakit.eval.metrics import summed_token_loss
            from lorakit.ops.recompute import recompute_saved_tensors

            with recompute_saved_tensors(on_keep):
                total, count = summed_token_loss(self.model, batch)
            return total / count

    def step(self, batch: dict) -> float:
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def memory_split(self, batch: dict) -> dict:
        """Bytes of the weights (parameters and buffers, frozen and trained), the optimizer state, and of what
        autograd keeps for the backward of one step: activations, and among them anything vocabulary-wide
        (logits). Measured on an extra step (run after the timed ones)."""
        weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*self.model.parameters(), *self.model.buffers()]}
        optimizer = sum(t.untyped_storage().nbytes() for state in self.optimizer.state.values()
                        for t in state.values() if isinstance(t, torch.Tensor))
        saved: dict[int, tuple[int, bool]] = {}

        def count(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = (storage.nbytes(), tensor.dim() > 0 and tensor.shape[-1] == self.vocab)

        loss = self.loss(batch, on_keep=count)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        logits = sum(n for n, vocab_wide in saved.values() if vocab_wide)
        return {"weights_mb": _mb(sum(weights.values())), "optimizer_mb": _mb(optimizer),
                "activations_mb": _mb(sum(n for n, _ in saved.values()) - logits), "logits_mb": _mb(logits)}


def _mb(nbytes: int) -> float:
    return round(nbytes / 2 ** 20, 1)
