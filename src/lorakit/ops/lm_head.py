"""Running a causal LM up to its output head, so that the loss can be computed from the final hidden states
(cross_entropy.py) without the full logits.

    head = output_head(model)                  # the head's nn.Linear, or None
    if returns_head_output(head):              # known from an earlier forward
        with head_returns_its_input(head):
            hidden = model(**inputs).logits    # (batch, length, hidden size): what the head would have read
    else:
        with watch_head(head) as watched:      # the usual forward, watched once
            logits = model(**inputs).logits
        watched.conclude(logits)               # remembers whether logits == the head's output

The model is still called as a whole (through any DDP wrapper, hooks and adapters); only the head's forward is
swapped for the identity during the call. That is right only when the model returns the head's output as it
is: some architectures scale or soft-cap the logits after the head (Gemma 2, Cohere, Granite). So the first
forward through a head runs as usual, and a forward hook compares what the head returned with the logits the
model returned; the answer is remembered on the head module, and from the next batch on the fast path is taken
where it applies.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_FLAG = "_lorakit_returns_head_output"


def _unwrapped(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when it is a plain dense nn.Linear (not wrapped by an adapter, not quantized,
    not sharded); None otherwise."""
    get_head = getattr(_unwrapped(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or type(head.weight) not in (nn.Parameter, torch.Tensor):
        return None
    return head


def returns_head_output(head: nn.Linear | None) -> bool:
    """True when an earlier forward showed the model returning this head's output unchanged as its logits."""
    return head is not None and getattr(head, _FLAG, None) is True


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


class _HeadWatch:
    def __init__(self, head: nn.Linear | None) -> None:
        self.head, self.output = head, None

    def conclude(self, logits: torch.Tensor) -> None:
        """Remember whether `logits` (what the model returned) is what the head returned, bit for bit."""
        if self.head is not None and not hasattr(self.head, _FLAG):
            same = self.output is not None and self.output.shape == logits.shape and torch.equal(self.output, logits)
            setattr(self.head, _FLAG, same)


@contextlib.contextmanager
def watch_head(head: nn.Linear | None):
    """Record the head's output during a forward, the first time this head is seen (then once and for all)."""
    watch = _HeadWatch(head)
    if head is None or hasattr(head, _FLAG):
        yield watch
        return

    def record(module, args, output):
        watch.output = output

    handle = head.register_forward_hook(record)
    try:
        yield watch
    finally:
        handle.remove()
