"""Cheap activations recomputed in the backward pass instead of kept: the memory half of the fused modules.

Autograd keeps every tensor a backward needs until that backward runs. Some of them are cheap elementwise
functions of tensors that are kept anyway: the normalised hidden states that q/k/v and gate/up save for their
weight gradients (= rms_norm(x), from the x and 1/rms the norm keeps), and the MLP's silu(gate) * up that
down_proj saves (from gate and up, which the gated activation keeps). A kernel that produces such a tensor
registers a *recipe* for it (`register`); while `recompute_saved_tensors()` is active, a saved-tensor hook swaps
each registered tensor for its recipe when autograd saves it, and recomputes it (once, however many backward
functions saved it) when the backward unpacks it. The recomputed value is the same bit for bit (the same
operations on the same inputs); an input changed in place between forward and backward is an error, as it is
for autograd's own saved tensors.

On SmolLM2-135M (4 x 256 tokens, bf16) this removes 135 MB of the 662 MB of activations a step keeps, for a few
elementwise passes (docs/performance.md). Inside a region that already recomputes (activation checkpointing
installs its own saved-tensor hooks, which take precedence) nothing changes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

_active = 0  # depth of recompute_saved_tensors() contexts; recipes are registered only inside one
_recipes: dict[int, Recipe] = {}


class Recipe:
    """`fn(*inputs)`, which produced a registered tensor: kept by autograd instead of the tensor."""

    __slots__ = ("output", "fn", "inputs", "versions", "value", "__weakref__")

    def __init__(self, output: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]):
        self.output = weakref.ref(output)
        self.fn, self.inputs = fn, inputs
        self.versions = tuple(t._version for t in inputs)
        self.value: torch.Tensor | None = None

    def recompute(self) -> torch.Tensor:
        if self.value is None:
            if tuple(t._version for t in self.inputs) != self.versions:
                raise RuntimeError("a tensor needed to recompute an activation for the backward pass was modified "
                                   "in place after the forward pass; do not modify activations in place, or train "
                                   "with train.fused_modules=false")
            with torch.no_grad():
                self.value = self.fn(*self.inputs)
        return self.value


def register(output: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    """Declare `output == fn(*inputs)` (bit for bit), so that autograd may keep the recipe instead of `output`.
    Called from a kernel's autograd forward when its output will have a backward; a no-op outside
    `recompute_saved_tensors()`."""
    if not _active:
        return
    key = id(output)
    recipe = Recipe(output, fn, inputs)
    _recipes[key] = recipe
    weakref.finalize(output, _forget, key, weakref.ref(recipe))


def _forget(key: int, recipe_ref: weakref.ref) -> None:
    if _recipes.get(key) is recipe_ref():
        del _recipes[key]


def _pack(tensor: torch.Tensor):
    recipe = _recipes.get(id(tensor))
    if recipe is not None and recipe.output() is tensor:
        return recipe
    return tensor


def _unpack(packed):
    return packed.recompute() if isinstance(packed, Recipe) else packed


@contextlib.contextmanager
def recompute_saved_tensors(on_keep: Callable[[torch.Tensor], None] | None = None):
    """Keep recipes instead of registered tensors for the backward, in the forward passes run inside.
    `on_keep(tensor)`, if given, sees every tensor autograd keeps as it is (what a memory count wants)."""
    global _active
    pack = _pack
    if on_keep is not None:
        def pack(tensor):
            kept = _pack(tensor)
            if kept is tensor:
                on_keep(tensor)
            return kept
    _active += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _active -= 1
