"""Running a causal LM up to its output head, so that the loss can be computed from the final hidden states
(cross_entropy.py) without the full logits.

    head = plain_output_head(model)          # the head's nn.Linear, or None when the loss needs the logits
    with head_returns_its_input(head):
        hidden = model(**inputs).logits      # (batch, length, hidden size): what the head would have read

    with head_on_lorakit_matmul(model):        # generation: the head multiplies on lorakit.ops.matmul.linear
        model.generate(...)

The model is still called as a whole (through any DDP wrapper, hooks and adapters); only the head's forward is
swapped, for the duration of the call, for the identity. That is right only when the model returns the head's
output as it is: some architectures scale or soft-cap the logits after the head (Gemma 2, Cohere, Granite). So
the first time a head is seen, a two-token probe runs the model both ways and compares head(hidden) with the
logits, bit for bit; the answer is remembered on the head module.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorakit.ops.matmul import linear_layer

_PLAIN_FLAG = "_lorakit_returns_logits_as_is"


def _unwrapped(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@contextlib.contextmanager
def head_returns_its_input(head: nn.Module):
    """The head's forward is the identity inside the block (an instance attribute shadows the class method)."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The output head as an nn.Linear whose output the model returns unchanged as `logits`, else None (no head
    found, a head that is not a plain dense Linear, sharded weights, or logits post-processed by the model)."""
    inner = _unwrapped(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or type(head.weight) not in (nn.Parameter, torch.Tensor) \
            or hasattr(head.weight, "full_tensor"):
        return None
    if not hasattr(head, _PLAIN_FLAG):
        setattr(head, _PLAIN_FLAG, _logits_are_head_output(inner, head))
    return head if getattr(head, _PLAIN_FLAG) else None


@torch.no_grad()
def _logits_are_head_output(model: nn.Module, head: nn.Linear) -> bool:
    """Run two tokens through the model, with the head and with the identity in its place; True when the logits
    are exactly head(hidden). Eval mode (no dropout, no random numbers drawn); the mode is restored."""
    was_training = model.training
    ids = torch.zeros((1, 2), dtype=torch.long, device=head.weight.device)
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    try:
        model.eval()
        logits = _logits(model(input_ids=ids, **kwargs))
        with head_returns_its_input(head):
            hidden = _logits(model(input_ids=ids, **kwargs))
        return (isinstance(logits, torch.Tensor) and isinstance(hidden, torch.Tensor)
                and hidden.shape[-1] == head.in_features and torch.equal(head(hidden), logits))
    except Exception:  # noqa: BLE001 - any model this probe cannot drive keeps the full-logits loss
        return False
    finally:
        model.train(was_training)


def _logits(outputs):
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


class HeadOnLorakitMatmul:
    """While installed, the output head computes without autograd through lorakit.ops.matmul.linear on a
    contiguous copy of its input (with autograd, its own forward). Two things, both for generation:

    - A decoded token's batch is a few rows, which `linear` gives to lorakit's few-rows kernel: PyTorch's own
      call rearranges the whole head (49k x 576 for SmolLM2, read once a token) on every call (8 rows: bf16 3.96 ->
      2.25 ms, fp32 15.5 -> 6.2 ms a token; docs/performance.md, optimisation 39).
    - transformers passes the head `hidden[:, -1:, :]`, a strided view of the prompt's states. With the head's
      weight frozen, PyTorch's matmul does not copy such an input into one matrix (it would, to spare the weight's
      gradient, if the weight required one) but runs a batched matmul over the weight expanded per row: the head
      read once per prompt, 2x the time at 8 prompts and 6x at 32 (optimisation 28). The copy of the rows' last
      states costs nothing next to that.

    The values are those of the head's own forward to fp32 rounding (the kernels sum in another order).
    remove() puts the head's forward back."""

    def __init__(self, head: nn.Linear) -> None:
        self.head = head
        head.forward = self._forward  # an instance attribute shadows the class method

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear_layer(self.head, hidden if torch.is_grad_enabled() else hidden.contiguous())

    def remove(self) -> None:
        if self.head.__dict__.get("forward") == self._forward:
            del self.head.forward


def head_to_lorakit_matmul(model: nn.Module) -> HeadOnLorakitMatmul | None:
    """Install HeadOnLorakitMatmul on the model's output head; the serving engine keeps it for its model's life.
    None, the head left as it is, when the model has no nn.Linear head or when something already replaced the
    head's forward (accelerate's device hooks, for weights offloaded or on another device, wrap it that way)."""
    get_head = getattr(_unwrapped(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear) or "forward" in head.__dict__:
        return None
    return HeadOnLorakitMatmul(head)


@contextlib.contextmanager
def head_on_lorakit_matmul(model: nn.Module):
    """head_to_lorakit_matmul for the duration of the block."""
    handle = head_to_lorakit_matmul(model)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
