"""Evaluation during and after training: validation loss / perplexity, accuracy for classification, and
ROUGE / exact match of generated answers (at the end of training)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorakit.eval.generation import generate_batch
from lorakit.eval.metrics import exact_match, perplexity, rouge_scores, summed_token_loss
from lorakit.train.batching import micro_batches
from lorakit.train.config import RunConfig
from lorakit.train.data import generation_prompts, load_splits
from lorakit.train.distributed import DistContext


@torch.no_grad()
def evaluate_model(model, tokenizer, val_rows: list[dict], collate, cfg: RunConfig, ctx: DistContext,
                   with_generation: bool = False) -> dict:
    """Metrics over the validation rows, computed on every process for its share and summed."""
    was_training = model.training
    model.eval()
    try:
        metrics = _loss_metrics(model, val_rows, collate, cfg, ctx)
        if with_generation and cfg.task_type == "CAUSAL_LM" and cfg.eval.generate and ctx.world_size == 1:
            metrics.update(generation_metrics(model, tokenizer, cfg))
    finally:
        model.train(was_training)
    return metrics


def _loss_metrics(model, val_rows, collate, cfg, ctx) -> dict:
    batches = micro_batches(list(range(len(val_rows))), cfg.eval.batch_size)
    per_rank = math.ceil(len(batches) / ctx.world_size)
    mine = batches[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    # every process runs the same number of forwards (sharded models need it); extras count for nothing
    padded = [(b, 1.0) for b in mine] + [(batches[0], 0.0)] * (per_rank - len(mine))
    loss_sum = tokens = correct = 0.0
    config = getattr(model, "config", None)
    for indices, weight in padded:
        batch = {k: v.to(ctx.device) for k, v in collate([val_rows[i] for i in indices]).items()}
        if cfg.task_type == "SEQ_CLS":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += weight * float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += weight * float((logits.argmax(-1) == batch["labels"]).sum())
            tokens += weight * len(indices)
        else:
            batch_loss, batch_tokens = summed_token_loss(model, batch, config=config)
            loss_sum += weight * float(batch_loss)
            tokens += weight * batch_tokens
    loss_sum, tokens, correct = ctx.sum(loss_sum), ctx.sum(tokens), ctx.sum(correct)
    if tokens == 0:
        return {}
    metrics = {"loss": loss_sum / tokens, "perplexity": perplexity(loss_sum / tokens)}
    if cfg.task_type == "SEQ_CLS":
        metrics["accuracy"] = correct / tokens
    return metrics


def generation_metrics(model, tokenizer, cfg: RunConfig) -> dict:
    """ROUGE-1/2/L/Lsum and exact match of greedy (or sampled) answers on the validation records."""
    answers = validation_answers(model, tokenizer, cfg)
    return answer_metrics(answers[1], answers[2]) if answers else {}


def validation_answers(model, tokenizer, cfg: RunConfig) -> tuple[list[str], list[str], list[str]] | None:
    """(prompts as text, generated answers, reference answers) on the validation records, or None when the
    data has no prompt/answer pairs (plain text)."""
    splits = load_splits(cfg.data)
    if splits.format == "text":
        return None
    prompts = generation_prompts(splits.val, tokenizer, cfg.data.template)
    if cfg.eval.max_samples:
        prompts = prompts[:cfg.eval.max_samples]
    if not prompts:
        return None
    predictions = generate_batch(
        model, tokenizer, [p.prompt_ids for p in prompts], max_new_tokens=cfg.eval.max_new_tokens,
        do_sample=cfg.eval.do_sample, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
        batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
    texts = [tokenizer.decode(p.prompt_ids) for p in prompts]
    return texts, predictions, [p.reference for p in prompts]


def answer_metrics(predictions: list[str], references: list[str]) -> dict:
    return {**rouge_scores(predictions, references), "exact_match": exact_match(predictions, references),
            "generated": len(predictions)}
