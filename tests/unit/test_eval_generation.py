"""lorakit.eval.generation: batched (left-padded) generation, stopping, sampling seeds, streaming."""

import pytest
import torch
from torch import nn

from lorakit.eval.generation import GenerationOptions, generate_batch, stop_token_ids, stream_generate
from tests.tiny import tiny_gpt2, tiny_llama, tiny_t5, tiny_tokenizer

LENGTHS = [7, 3, 12, 5, 9]  # deliberately unsorted, so sorting inside generate_batch must be undone


def _prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 261, (n,), generator=g).tolist() for n in lengths]


def _reference_greedy(model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """Plain transformers generate on one unpadded prompt: the ground truth for the batched path."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=4, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    new = new[: new.index(4)] if 4 in new else new
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_batched_greedy_equals_one_by_one_in_original_order(builder, tokenizer):
    model = builder()
    prompts = _prompts()
    singles = [_reference_greedy(model, tokenizer, p, 8) for p in prompts]
    assert len(set(singles)) == len(singles)  # distinct answers, so a mix-up of the order would show
    assert [generate_batch(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts] == singles
    assert generate_batch(model, tokenizer, prompts, max_new_tokens=8, batch_size=8) == singles
    assert generate_batch(model, tokenizer, prompts, max_new_tokens=8, batch_size=2) == singles


def test_encoder_decoder_t5(tokenizer):
    model = tiny_t5()
    prompts = _prompts()
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    singles = [generate_batch(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == singles
    with torch.no_grad():  # the output holds only new text: no prompt prefix, no decoder start token
        out = model.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False, eos_token_id=4)
    expected = tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=True).strip()
    assert singles[0] == expected and expected


def _count_forward_calls(model) -> list[int]:
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


def test_stops_at_eos(tokenizer):
    model = tiny_llama()
    # A head whose only signal is a bias on <|im_end|> (id 4): eos is the most likely token everywhere.
    model.lm_head = nn.Linear(32, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[4] = 10.0
    calls = _count_forward_calls(model)
    assert generate_batch(model, tokenizer, _prompts()[:2], max_new_tokens=20) == ["", ""]
    assert len(calls) == 1  # one prefill step produced eos for every row; no further decoding steps


def test_stops_at_the_model_generation_eos_and_drops_what_follows(tokenizer):
    model = tiny_llama()
    prompt = _prompts()[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    stop = new[3]  # an ordinary byte token: skip_special_tokens would not remove it
    model.generation_config.eos_token_id = stop
    expected = tokenizer.decode(new[: new.index(stop)], skip_special_tokens=True).strip()
    full = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert expected != full
    assert generate_batch(model, tokenizer, [prompt], max_new_tokens=8) == [expected]


def test_stop_token_ids_include_eos_and_chat_end_of_turn():
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "</s>"  # id 2; <|im_end|> (id 4) must still stop as the ChatML end of turn
    model = tiny_llama()
    model.generation_config.eos_token_id = [2, 7]
    assert stop_token_ids(model, tokenizer) == [2, 4, 7]


def test_sampling_is_reproducible_with_a_seed(tokenizer):
    model = tiny_llama()
    prompts = _prompts()
    options = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    rng_before = torch.get_rng_state()
    first = generate_batch(model, tokenizer, prompts, seed=123, **options)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the seed does not leak into the global RNG
    assert generate_batch(model, tokenizer, prompts, seed=123, **options) == first
    assert generate_batch(model, tokenizer, prompts, seed=124, **options) != first
    assert first != generate_batch(model, tokenizer, prompts, max_new_tokens=10)  # really sampled


def test_restores_training_mode_and_generates_in_eval_mode(tokenizer):
    model = tiny_llama(attention_dropout=0.5)
    model.train()
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    generate_batch(model, tokenizer, _prompts()[:2], max_new_tokens=3)
    assert seen and not any(seen)
    assert model.training is True


class RecordingPeftModel(nn.Module):
    """Stands in for lorakit's PeftModel: accepts adapter_names and records what each batch got."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.config, self.generation_config = base.config, base.generation_config
        self.calls = []

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def generate(self, input_ids, attention_mask, adapter_names, **kwargs):
        self.calls.append((input_ids, attention_mask, adapter_names))
        return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_adapter_names_are_sliced_with_their_prompts(tokenizer):
    model = RecordingPeftModel(tiny_llama())
    prompts = _prompts()
    names = [f"adapter{i}" for i in range(len(prompts))]
    generate_batch(model, tokenizer, prompts, max_new_tokens=2, batch_size=2, adapter_names=names)
    assert len(model.calls) == 3
    for input_ids, attention_mask, batch_names in model.calls:
        assert len(batch_names) == input_ids.shape[0]
        for row, name in enumerate(batch_names):
            unpadded = input_ids[row][attention_mask[row].bool()].tolist()
            assert unpadded == prompts[int(name.removeprefix("adapter"))]
            assert attention_mask[row, -1] == 1  # left padding: every prompt ends in the last column


def test_stream_generate_pieces_join_to_the_batched_answer(tokenizer):
    model = tiny_llama()
    prompt = _prompts()[2]
    pieces = list(stream_generate(model, tokenizer, prompt, max_new_tokens=12))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces).strip() == generate_batch(model, tokenizer, [prompt], max_new_tokens=12)[0]


def test_stream_generate_can_be_closed_early(tokenizer):
    model = tiny_llama()
    model.train()
    stream = stream_generate(model, tokenizer, _prompts()[0], max_new_tokens=200)
    next(stream)
    stream.close()  # sets the cancel event and joins the worker thread; must not hang
    assert model.training is True


def test_stream_generate_reraises_errors_from_the_worker(tokenizer):
    model = tiny_llama()

    def broken_generate(**kwargs):
        raise RuntimeError("boom")

    model.generate = broken_generate
    with pytest.raises(RuntimeError, match="boom"):
        list(stream_generate(model, tokenizer, [5, 6, 7]))


@pytest.mark.parametrize(
    "prompt_ids, message",
    [
        ([], "prompt_ids is empty"),
        ([5, 6, 7], r"prompt_ids\[0\] is an int.*Wrap a single prompt"),
        (["hello"], r"prompt_ids\[0\] must be a list of token ids"),
        ([[5, 6], []], r"prompt_ids\[1\] is empty"),
        ([[5, 6.0]], r"prompt_ids\[0\]\[1\] must be an int"),
        ([[5, 999]], r"outside the model's vocabulary"),
        ([[-1]], r"outside the model's vocabulary"),
        (torch.tensor([[5, 6]]), "must be a list of prompts"),
        ([torch.tensor([5, 6])], "tensor.tolist"),
        ([{"input_ids": [5, 6]}], r"pass its \['input_ids'\]"),
    ],
)
def test_bad_prompts_are_rejected(prompt_ids, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        generate_batch(tiny_llama(), tokenizer, prompt_ids)


def test_bad_options_are_rejected(tokenizer):
    model = tiny_llama()
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(model, tokenizer, [[5]], batch_size=0)
    with pytest.raises(ValueError, match="adapter_names has 2 entries for 1 prompts"):
        generate_batch(model, tokenizer, [[5]], adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="is empty"):
        stream_generate(model, tokenizer, [])  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="GenerationOptions.temperature"):
        stream_generate(model, tokenizer, [5], do_sample=True, temperature=-1.0)


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", 0), ("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
     ("do_sample", 1), ("seed", 1.5)],
)
def test_generation_options_validation(field, value):
    with pytest.raises(ValueError, match=f"GenerationOptions.{field}"):
        GenerationOptions(**{field: value})
