"""Loading an adapter for inference: what `generate`, `eval`, `chat`, `merge` (and a server) share.

    model = load_adapter_for_inference(base_model, "runs/my-run/adapter")

On top of `PeftModel.from_pretrained` it refuses, with a message that says what to do:
- an adapter whose weights hold NaN or inf (saved from a diverged run, or corrupt): it would answer every prompt
  with garbage or nothing, and exit 0;
- an adapter saved only as a pickle (`adapter_model.bin`) unless the caller opts in: pickle files can run code
  when read, so the message says how to opt in (`--allow-pickle`, `allow_pickle=True`) or how to convert it.
"""

from __future__ import annotations

import os

import torch

from lorakit.adapter_files import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME

DEFAULT_ADAPTER = "default"


def load_adapter_for_inference(base_model, adapter_dir: str, allow_pickle: bool = False,
                               adapter_name: str = DEFAULT_ADAPTER):
    """A PeftModel with the adapter in `adapter_dir` on `base_model`, checked to hold only finite weights."""
    from lorakit.model import PeftModel

    check_pickle_allowed(adapter_dir, allow_pickle)
    model = PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name, allow_pickle=allow_pickle)
    check_finite(model.adapter_state_dict(adapter_name), adapter_dir)
    return model


def check_pickle_allowed(adapter_dir: str, allow_pickle: bool) -> None:
    if allow_pickle or not os.path.isdir(adapter_dir) or os.path.isfile(os.path.join(adapter_dir, WEIGHTS_NAME)):
        return
    pickle_path = os.path.join(adapter_dir, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickle_path):
        target = os.path.join(adapter_dir, WEIGHTS_NAME)
        raise ValueError(
            f"{adapter_dir} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run code when read; lorakit "
            "reads safetensors unless told otherwise. If you trust where it comes from, pass --allow-pickle "
            "(allow_pickle=True in Python: it is read with torch.load(weights_only=True)), or convert it once: "
            f"python -c \"import torch; from safetensors.torch import save_file; save_file(torch.load('{pickle_path}', "
            f"weights_only=True), '{target}')\"")


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(name, values that are NaN or inf, all values) of every tensor holding any."""
    found = []
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                found.append((name, bad, tensor.numel()))
    return found


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse adapter weights holding NaN/inf, naming the first bad tensor."""
    bad = nonfinite_tensors(tensors)
    if bad:
        name, count, total = bad[0]
        raise ValueError(
            f"the adapter {where} holds NaN/inf values in {len(bad)} of its {len(tensors)} tensors (e.g. {name}: "
            f"{count} of {total} values), so every answer would be garbage. It was saved from a diverged training "
            "run or is corrupt: use an earlier checkpoint of the run (each checkpoint-N/ holds a usable adapter), "
            "or train again with a lower train.learning_rate.")
