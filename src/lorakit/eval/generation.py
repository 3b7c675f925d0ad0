"""Batched and streaming text generation around `model.generate`.

Prompts arrive as token ids (already chat-templated by the caller). `generate_batch` sorts them by
length so each batch pads little, left-pads decoder-only prompts (the new tokens must start at the
same column for every row), and returns only the new text, in the caller's order. `stream_generate`
yields text pieces of one answer as they are produced, for an interactive chat.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3) and GPT-style end of text.
# Generation stops at any of them that the tokenizer knows, besides the eos ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick each new token."""

    # Most tokens to generate after the prompt.
    max_new_tokens: int = 64
    # False: greedy decoding (deterministic). True: sample from the (filtered) distribution.
    do_sample: bool = False
    # Sampling only: logits are divided by this (> 0); below 1 is sharper, above 1 flatter.
    temperature: float = 1.0
    # Sampling only: keep the smallest set of tokens whose probability sums to top_p, in (0, 1]; 1 = off.
    top_p: float = 1.0
    # Sampling only: keep the k most likely tokens; 0 = off.
    top_k: int = 0
    # Seeds the sampler so the same call gives the same text; None = use the global RNG state.
    seed: int | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"{owner}.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"{owner}.do_sample must be True or False, got {self.do_sample!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"{owner}.temperature must be a number > 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"{owner}.top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"{owner}.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"{owner}.seed must be an integer or None, got {self.seed!r}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`; neutral values for greedy so no sampler is built."""
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False,
                    "temperature": 1.0, "top_p": 1.0, "top_k": None}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "top_k": self.top_k or None}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ---- inputs -----------------------------------------------------------------------------------------
def _vocab_limit(model: nn.Module) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "num_embeddings", None)


def _check_prompt(prompt, index: int, vocab_limit: int | None, where: str) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        raise ValueError(f"{where}[{index}] is a tensor; pass plain lists of ints (tensor.tolist()).")
    if _is_int(prompt):
        raise ValueError(
            f"{where}[{index}] is an int, but each prompt must be a list of token ids. "
            "Wrap a single prompt in a list: [ids]."
        )
    if isinstance(prompt, Mapping) and "input_ids" in prompt:
        raise ValueError(f"{where}[{index}] is a {type(prompt).__name__} (a tokenizer output); pass its "
                         "['input_ids'] list instead.")
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise ValueError(f"{where}[{index}] must be a list of token ids, got {type(prompt).__name__}; tokenize "
                         "text first, e.g. tokenizer.apply_chat_template(messages, tokenize=True)['input_ids'].")
    if len(prompt) == 0:
        raise ValueError(f"{where}[{index}] is empty; every prompt needs at least one token.")
    for pos, token in enumerate(prompt):
        if not _is_int(token):
            raise ValueError(f"{where}[{index}][{pos}] must be an int token id, got {token!r}")
        if token < 0 or (vocab_limit is not None and token >= vocab_limit):
            raise ValueError(f"{where}[{index}][{pos}] = {token} is outside the model's vocabulary "
                             f"[0, {vocab_limit}); was it tokenized with a different tokenizer?")
    return [int(t) for t in prompt]


def check_prompts(model: nn.Module, prompt_ids) -> list[list[int]]:
    """Validate a list of prompts (each a non-empty list of in-vocabulary ints); return plain int lists."""
    if isinstance(prompt_ids, torch.Tensor) or not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, str):
        raise ValueError(f"prompt_ids must be a list of prompts (lists of token ids), got {type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; pass at least one prompt.")
    limit = _vocab_limit(model)
    return [_check_prompt(p, i, limit, "prompt_ids") for i, p in enumerate(prompt_ids)]


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end an answer: tokenizer eos, the model's generation eos, chat end-of-turn tokens."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if value is not None:
            ids.update([value] if _is_int(value) else value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return sorted(int(i) for i in ids)


def _pad_id(tokenizer, stop_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if stop_ids:  # common for Llama-style tokenizers; padded positions are masked out anyway
        return stop_ids[0]
    raise ValueError("The tokenizer has no pad token and no eos token; set tokenizer.pad_token before generating.")


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def pad_prompts(prompts: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max); padding on the left or the right, mask 0 there."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        input_ids[row, span] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


# ---- generation ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the block, then restore the caller's RNG state (the seed does not leak)."""
    if seed is None:
        yield
        return
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    else:
        devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _trim_new_tokens(row: list[int], stop_ids: set[int]) -> list[int]:
    """Cut at the first stop token: the stop token and the padding generate adds after it go."""
    for pos, token in enumerate(row):
        if token in stop_ids:
            return row[:pos]
    return row


def _generate_one_batch(model, tokenizer, prompts, options, stop_ids, pad_id, adapter_names) -> list[str]:
    encoder_decoder = _is_encoder_decoder(model)
    input_ids, attention_mask = pad_prompts(prompts, pad_id, left=not encoder_decoder)
    device = model_device(model)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}  # only lorakit's PeftModel takes it
    output = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        eos_token_id=stop_ids or None, pad_token_id=pad_id, **options.generate_kwargs(), **extra,
    )
    # Decoder-only output = padded prompt + new tokens; encoder-decoder output = decoder start token + new tokens.
    new_tokens = output[:, 1:] if encoder_decoder else output[:, input_ids.shape[1]:]
    stop_set = set(stop_ids)
    rows = [_trim_new_tokens(row, stop_set) for row in new_tokens.tolist()]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def generate_batch(model: nn.Module, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 64,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   batch_size: int = 8, adapter_names: list[str] | None = None,
                   seed: int | None = None) -> list[str]:
    """Generate an answer for each prompt; returns the new text only (special tokens dropped, stripped).

    Prompts are sorted by length (longest first, so running out of memory shows on the first batch) and
    cut into batches of `batch_size`; results come back in the order of `prompt_ids`. Generation stops at
    eos / end-of-turn tokens or after `max_new_tokens`. `adapter_names[i]` picks the adapter for prompt i
    (lorakit PeftModel only). With a `seed`, sampling is reproducible for the same prompts and batch_size.
    """
    options = GenerationOptions(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    prompts = check_prompts(model, prompt_ids)
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts; "
                         "give one adapter name per prompt.")
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[str | None] = [None] * len(prompts)
    with _eval_mode(model), torch.inference_mode(), _seeded(seed, model_device(model)):
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            names = None if adapter_names is None else [adapter_names[i] for i in index]
            texts = _generate_one_batch(model, tokenizer, [prompts[i] for i in index], options,
                                        stop_ids, pad_id, names)
            for i, text in zip(index, texts):
                results[i] = text
    return results


# ---- streaming ----------------------------------------------------------------------------------------
def _stop_on_event(event: threading.Event):
    """A stopping criterion that ends generation once `event` is set (the reader went away)."""
    from transformers import StoppingCriteria

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopOnEvent()


def stream_generate(model: nn.Module, tokenizer, prompt_ids: list[int], max_new_tokens: int = 64,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    adapter_name: str | None = None, seed: int | None = None) -> Iterator[str]:
    """Yield the answer to one prompt in text pieces as they are generated (same options as generate_batch).

    `model.generate` runs in a background thread feeding a `TextIteratorStreamer`. Bad input raises here,
    before any thread starts. Closing the iterator early (e.g. Ctrl-C in a chat) stops generation at the
    next token. "".join(pieces).strip() equals generate_batch's text for the same prompt (as long as every
    stop token is a special token, which the streamer drops; generate_batch also cuts non-special ones).
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    options = GenerationOptions(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    prompt = _check_prompt(prompt_ids, 0, _vocab_limit(model), "[prompt_ids]")
    stop_ids = stop_token_ids(model, tokenizer)
    device = model_device(model)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()
    kwargs = dict(input_ids=torch.tensor([prompt], device=device),
                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                  eos_token_id=stop_ids or None, pad_token_id=_pad_id(tokenizer, stop_ids), streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([_stop_on_event(cancel)]), **options.generate_kwargs())
    if adapter_name is not None:
        kwargs["adapter_names"] = [adapter_name]
    return _stream_pieces(model, kwargs, streamer, cancel, seed, device)


def _stream_pieces(model, kwargs: dict, streamer, cancel: threading.Event, seed, device) -> Iterator[str]:
    failure: list[BaseException] = []

    def run() -> None:
        # inference_mode and the RNG fork are per thread, so they are entered here.
        try:
            with torch.inference_mode(), _seeded(seed, device):
                model.generate(**kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the reading thread below
            failure.append(err)
            streamer.end()  # unblock the reader

    with _eval_mode(model):
        worker = threading.Thread(target=run, name="lorakit-stream-generate", daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            cancel.set()
            worker.join()
    if failure:
        raise failure[0]
