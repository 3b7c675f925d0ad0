"""lorakit.eval.metrics: ROUGE, exact match, accuracy, perplexity and the token-weighted loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.eval.metrics import (
    accuracy,
    evaluate_loss,
    exact_match,
    normalize_text,
    perplexity,
    rouge_scores,
    split_sentences,
)
from tests.tiny import tiny_llama, tiny_t5

ROUGE_KEYS = {"rouge1", "rouge2", "rougeL", "rougeLsum"}


# ---- ROUGE ------------------------------------------------------------------------------------------
def test_rouge_identical_texts_score_one():
    scores = rouge_scores(["The cat sat on the mat. It purred."], ["The cat sat on the mat. It purred."])
    assert set(scores) == ROUGE_KEYS
    assert all(v == pytest.approx(1.0) for v in scores.values())


def test_rouge_disjoint_texts_score_zero():
    scores = rouge_scores(["alpha beta gamma"], ["delta epsilon zeta"])
    assert all(v == 0.0 for v in scores.values())


def test_rouge1_partial_overlap_matches_hand_computation():
    # prediction unigrams {the, cat, sat}: all 3 in the reference -> precision 3/3; recall 3/6 (6 ref tokens).
    # F = 2PR / (P + R) = 2 * 1 * 0.5 / 1.5 = 2/3. rouge2: bigrams "the cat", "cat sat" both match -> P=1, R=2/5.
    scores = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)


def test_rouge_is_the_mean_over_pairs():
    scores = rouge_scores(["same words here", "nothing shared"], ["same words here", "totally different"])
    assert scores["rouge1"] == pytest.approx(0.5)


def test_rouge_uses_the_stemmer():
    assert rouge_scores(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)


def test_rougelsum_splits_sentences():
    # One LCS over the whole text matches only "a b" or "c d" (rougeL = 0.5); summary-level LCS matches each
    # reference sentence against every predicted sentence, so with one sentence per line it is 1.0.
    scores = rouge_scores(["a b. c d."], ["c d. a b."])
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["rougeLsum"] == pytest.approx(1.0)


def test_split_sentences():
    assert split_sentences("  One. Two!  Three?\nFour ") == "One.\nTwo!\nThree?\nFour"


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        (["a"], ["a", "b"], "1 predictions but 2 references"),
        ([], [], "empty"),
        (["a", 3], ["a", "b"], r"predictions\[1\] must be a string"),
        ("abc", "abc", "must be a list of strings"),
    ],
)
def test_rouge_bad_input(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        rouge_scores(predictions, references)


# ---- exact match ------------------------------------------------------------------------------------
def test_normalize_text():
    assert normalize_text("  Hello \t  big\n world  ") == "Hello big world"
    assert normalize_text(" ABC d ", ignore_case=True) == "abc d"


def test_exact_match_normalises_whitespace_and_is_case_sensitive_by_default():
    predictions = ["  Paris\n", "a\tb", "ab", "hello World"]
    references = ["Paris", "a b", "a b", "Hello world"]
    assert exact_match(predictions, references) == pytest.approx(2 / 4)
    assert exact_match(predictions, references, ignore_case=True) == pytest.approx(3 / 4)


def test_exact_match_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        exact_match([], [])


# ---- accuracy and perplexity ------------------------------------------------------------------------
def test_accuracy_ignores_minus_100_labels():
    assert accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == pytest.approx(0.5)
    preds = torch.tensor([[5, 6, 7], [1, 2, 3]])
    labels = torch.tensor([[-100, 6, 0], [1, -100, -100]])
    assert accuracy(preds, labels) == pytest.approx(2 / 3)


def test_accuracy_bad_input():
    with pytest.raises(ValueError, match="shape"):
        accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no labels"):
        accuracy([1, 2], [-100, -100])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(float("nan")))
    with pytest.raises(ValueError, match="mean_loss must be >= 0"):
        perplexity(-0.5)


# ---- evaluate_loss ----------------------------------------------------------------------------------
def _lm_batch(seed: int, batch: int, length: int, masked_prefix: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 260, (batch, length), generator=g)
    labels = input_ids.clone()
    labels[:, :masked_prefix] = -100  # e.g. a prompt that is not trained on
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _hand_loss_sum(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    token_losses = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    return float(token_losses.sum()), int(keep.sum())


def test_evaluate_loss_weights_batches_by_token_count():
    model = tiny_llama()
    small = _lm_batch(1, batch=1, length=4, masked_prefix=1)  # labels[:, 1:] has 3 unmasked
    large = _lm_batch(2, batch=3, length=12, masked_prefix=3)  # 3 rows * 9 = 27
    (sum_a, n_a), (sum_b, n_b) = _hand_loss_sum(model, small), _hand_loss_sum(model, large)
    assert (n_a, n_b) == (3, 27)
    expected = (sum_a + sum_b) / (n_a + n_b)
    mean_of_means = (sum_a / n_a + sum_b / n_b) / 2
    assert abs(expected - mean_of_means) > 1e-3  # otherwise this test could not tell the two apart

    result = evaluate_loss(model, [small, large])
    assert result["tokens"] == 30
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_evaluate_loss_matches_the_model_loss_on_one_batch():
    model = tiny_llama()
    batch = _lm_batch(3, batch=2, length=10, masked_prefix=4)
    with torch.no_grad():
        reference = float(model(**batch).loss)
    assert evaluate_loss(model, [batch])["loss"] == pytest.approx(reference, rel=1e-5)


def test_evaluate_loss_encoder_decoder_has_no_shift():
    model = tiny_t5()
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(5, 260, (2, 7), generator=g)
    labels = torch.randint(5, 260, (2, 5), generator=g)
    labels[1, 3:] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    with torch.no_grad():
        reference = float(model(**batch).loss)  # HF: mean over the 8 label tokens
    result = evaluate_loss(model, [batch])
    assert result["tokens"] == 8
    assert result["loss"] == pytest.approx(reference, rel=1e-5)


def test_evaluate_loss_restores_training_mode_and_uses_eval_mode():
    model = tiny_llama(attention_dropout=0.5)
    model.train()
    seen_modes = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    batch = _lm_batch(5, batch=2, length=8, masked_prefix=0)
    first = evaluate_loss(model, [batch])["loss"]
    second = evaluate_loss(model, [batch])["loss"]
    assert model.training is True
    # every forward in eval mode (the first also runs the LM-head probe's forwards, lorakit/ops/lm_head.py)
    assert len(seen_modes) >= 2 and not any(seen_modes)
    assert first == second  # dropout off, so deterministic
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_loss_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no label tokens"):
        evaluate_loss(model, [])
    with pytest.raises(ValueError, match="no label tokens"):
        evaluate_loss(model, [_lm_batch(6, batch=1, length=5, masked_prefix=5)])
    with pytest.raises(ValueError, match=r"batch 0 has no \['labels'\]"):
        evaluate_loss(model, [{"input_ids": torch.ones(1, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="must be a dict of tensors"):
        evaluate_loss(model, [torch.ones(1, 3, dtype=torch.long)])
