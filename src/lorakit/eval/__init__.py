"""Evaluation: metrics (ROUGE, exact match, accuracy, perplexity, token-weighted loss) and generation helpers."""

from lorakit.eval.generation import GenerationOptions, generate_batch, stop_token_ids, stream_generate
from lorakit.eval.metrics import (
    accuracy,
    evaluate_loss,
    exact_match,
    normalize_text,
    perplexity,
    rouge_scores,
    split_sentences,
)

__all__ = [
    "GenerationOptions",
    "accuracy",
    "evaluate_loss",
    "exact_match",
    "generate_batch",
    "normalize_text",
    "perplexity",
    "rouge_scores",
    "split_sentences",
    "stop_token_ids",
    "stream_generate",
]
