"""Evaluation metrics: ROUGE, exact match, accuracy, perplexity, and the token-weighted LM loss.

Every metric takes plain Python lists (or tensors for ids) and returns plain floats, so results can be
written to JSON as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.eval.generation import model_device
from lorakit.ops.cross_entropy import linear_cross_entropy
from lorakit.ops.lm_head import head_returns_its_input, plain_output_head

IGNORE_INDEX = -100  # label value that takes no part in the loss (HF convention)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at ., ! or ? followed by whitespace. nltk's punkt model (what the HF summarization
# examples use) needs a data download we cannot do; this regex only matters for rougeLsum, which
# splits on newlines, and gives the same split on ordinary prose (it also splits after "e.g." etc.).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WHITESPACE = re.compile(r"\s+")


def _check_text_pairs(predictions: Sequence[str], references: Sequence[str], metric: str) -> None:
    for name, values in (("predictions", predictions), ("references", references)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise ValueError(f"{metric}: {name} must be a list of strings, got {type(values).__name__}")
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise ValueError(f"{metric}: {name}[{i}] must be a string, got {type(value).__name__}")
    if len(predictions) != len(references):
        raise ValueError(
            f"{metric}: got {len(predictions)} predictions but {len(references)} references; "
            "pass one reference per prediction, in the same order."
        )
    if not predictions:
        raise ValueError(f"{metric}: predictions and references are empty; there is nothing to score.")


def split_sentences(text: str) -> str:
    """Put each sentence of `text` on its own line (what rougeLsum expects), using a simple regex."""
    lines = (line.strip() for line in text.strip().splitlines())
    return "\n".join(s for line in lines if line for s in _SENTENCE_END.split(line) if s)


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (rouge1, rouge2, rougeL, rougeLsum), each in [0, 1].

    Uses Google's `rouge-score` with the Porter stemmer, like HF `evaluate`. For rougeLsum (summary-level
    LCS over sentences) the texts get one sentence per line first, as the HF summarization examples do.
    The mean is a plain average over pairs (no bootstrap).
    """
    from rouge_score.rouge_scorer import RougeScorer  # imported here: it pulls in nltk and absl

    _check_text_pairs(predictions, references, "rouge_scores")
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def normalize_text(text: str, ignore_case: bool = False) -> str:
    """Strip, collapse runs of whitespace to one space, and optionally lower-case."""
    text = _WHITESPACE.sub(" ", text.strip())
    return text.lower() if ignore_case else text


def exact_match(predictions: list[str], references: list[str], ignore_case: bool = False) -> float:
    """Fraction of predictions equal to their reference after `normalize_text`."""
    _check_text_pairs(predictions, references, "exact_match")
    hits = sum(
        normalize_text(p, ignore_case) == normalize_text(r, ignore_case) for p, r in zip(predictions, references)
    )
    return hits / len(predictions)


def accuracy(pred_ids, label_ids) -> float:
    """Fraction of positions where pred == label, over positions whose label is not -100.

    Takes class ids (shape (n,)) or token ids (any shape), as lists or tensors; shapes must match.
    """
    try:
        preds, labels = torch.as_tensor(pred_ids), torch.as_tensor(label_ids)
    except (TypeError, ValueError) as err:
        raise ValueError(f"accuracy: pred_ids and label_ids must be (nested) lists of ints or tensors ({err})")
    if preds.shape != labels.shape:
        raise ValueError(f"accuracy: pred_ids has shape {tuple(preds.shape)} but label_ids {tuple(labels.shape)}")
    keep = labels != IGNORE_INDEX
    counted = int(keep.sum())
    if counted == 0:
        raise ValueError("accuracy: no labels to score (empty, or every label is -100)")
    return int((preds[keep] == labels[keep]).sum()) / counted


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy in nats); inf when the exponential overflows, nan for a nan loss."""
    mean_loss = float(mean_loss)
    if mean_loss < 0:
        raise ValueError(f"perplexity: mean_loss must be >= 0 (a cross-entropy), got {mean_loss}")
    try:
        return math.exp(mean_loss)
    except OverflowError:  # mean_loss > ~709.78; a diverged model, not a crash
        return math.inf


def summed_token_loss(model: nn.Module, batch: Mapping, config=None) -> tuple[torch.Tensor, int]:
    """(sum of per-token cross-entropies as an fp32 tensor with grad, number of label tokens) for one batch.

    Causal LM: logits[:, t] predicts labels[:, t + 1]; the labels are shifted (not the logits, which would copy
    them). When the model returns its head's output unchanged (lorakit.ops.lm_head), the loss is computed from
    the final hidden states in chunks (lorakit.ops.cross_entropy): the full logits are never formed, and
    positions without a label cost nothing. Otherwise from the logits, in fp32 so that a bf16 model's loss sum
    keeps its precision over many tokens.
    Encoder-decoder: the model builds decoder inputs from `labels`; logits and labels are aligned.
    Sequence classification (labels of shape (B,)): one "token" per example.
    Decoder models run with use_cache=False: a KV cache would disable packed-sequence masking.
    `config` is the model's config when `model` is a wrapper without one (DistributedDataParallel).
    """
    labels = batch["labels"]
    config = config if config is not None else getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    # The model only needs labels to build the decoder input; for a causal LM it would compute a loss we redo.
    inputs = {k: v for k, v in batch.items() if k != "labels" or encoder_decoder}
    if getattr(config, "use_cache", None) is not None and labels.dim() > 1:
        inputs["use_cache"] = False
    causal = labels.dim() > 1 and not encoder_decoder
    if causal:
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t is scored against token t + 1
    head = plain_output_head(model) if causal else None
    if head is not None:
        with head_returns_its_input(head):
            hidden = _logits(model(**inputs))
        total = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1),
                                     head.bias)
    else:
        logits = _logits(model(**inputs))
        total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())


def _logits(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def _batch_to_device(batch, index: int, device: torch.device) -> dict:
    if not isinstance(batch, Mapping):
        raise ValueError(f"evaluate_loss: batch {index} must be a dict of tensors, got {type(batch).__name__}")
    missing = {"input_ids", "labels"} - set(batch)
    if missing:
        raise ValueError(f"evaluate_loss: batch {index} has no {sorted(missing)}; it needs input_ids and labels")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate_loss(model: nn.Module, batches: Iterable[Mapping], device=None) -> dict[str, float]:
    """Token-weighted mean LM loss over `batches` of input_ids / attention_mask / labels (B, T).

    loss = sum over batches and label tokens of -log p(label) / number of label tokens (labels != -100),
    so a batch with more tokens counts more: it is the loss over the whole set, not a mean of batch means.
    Returns {"loss", "perplexity", "tokens"}. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                batch_loss, batch_tokens = summed_token_loss(model, _batch_to_device(batch, index, device))
                total_loss += float(batch_loss)
                total_tokens += batch_tokens
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("evaluate_loss: no label tokens to score (no batches, or every label is -100)")
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": total_tokens}
