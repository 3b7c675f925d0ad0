"""The README's API example: LoRA on the embedded SmolLM2, a few training steps, save, reload, merge.

Run: .venv/bin/python examples/quickstart.py   (offline; the first run converts the embedded model, ~30 s)
"""

import tempfile

import torch

from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model
from lorakit.models import load_model_and_tokenizer

base, tokenizer = load_model_and_tokenizer("smollm2")  # SmolLM2-135M-Instruct, shipped with lorakit's setup
config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05, task_type=TaskType.CAUSAL_LM)
model = get_peft_model(base, config)
model.print_trainable_parameters()  # trainable params: 2,442,240 || all params: 136,957,248 || trainable%: 1.7832

# a few steps on one sentence, just to change the adapter
batch = tokenizer(["lorakit trains adapters, not the whole model."], return_tensors="pt")
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for _ in range(3):
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()

with tempfile.TemporaryDirectory() as adapter_dir:
    model.save_pretrained(adapter_dir)  # adapter_config.json + adapter_model.safetensors (PEFT format, ~19 MB)
    fresh, _ = load_model_and_tokenizer("smollm2")
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir)
    with torch.no_grad():
        same = torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
    print("reloaded adapter gives the same logits:", same)

    merged = reloaded.merge_and_unload()  # a plain LlamaForCausalLM again, with W = W0 + s B A
    print(type(merged).__name__)
