"""How each sequence picks its next token: greedy, or temperature + nucleus (top-p) sampling with its own seed.

Rows of one batch may use different settings. Greedy rows take the argmax of the logits, as `generate`
does without sampling, so a greedy answer does not depend on what else is in the batch.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's generation settings (OpenAI's names)."""

    max_tokens: int = 16
    # 0 = greedy (deterministic); otherwise the logits are divided by it before sampling.
    temperature: float = 1.0
    # Keep the smallest set of tokens whose probabilities sum to top_p, in (0, 1]; 1 = off.
    top_p: float = 1.0
    # Seeds this sequence's sampler: the same request gives the same text.
    seed: int | None = None
    # Keep generating after an end-of-sequence token (benchmarks with a fixed output length).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be a number in [0, 2], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(int(self.seed) % 2**63)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None], fallback: torch.Generator) -> list[int]:
    """logits: (n, V) -> one token id per row, each row with its own params and generator (`fallback` for
    rows without a seed)."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _sample(logits[row].float(), p, generator or fallback)
    return tokens


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
