"""The OpenAI API's request bodies and response objects (chat completions, completions, models, errors).

Field names, defaults and shapes are OpenAI's (https://platform.openai.com/docs/api-reference), so the
official clients work unchanged; `ignore_eos` is vLLM's extension. Options lorakit does not implement
(logprobs, penalties, tools, ...) are refused with a 400 that names them instead of being silently
ignored; unknown fields are ignored, as OpenAI does for fields like `user` and `metadata`.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# option -> the values that mean "not used" (anything else is refused)
UNSUPPORTED_OPTIONS = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}
MAX_STOP_STRINGS = 4  # as OpenAI


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What chat completions and completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def unsupported(self) -> list[str]:
        extra = self.model_extra or {}
        return sorted(k for k, neutral in UNSUPPORTED_OPTIONS.items() if k in extra and extra[k] not in neutral)

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        return stop


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        # the developer role is OpenAI's newer name for system
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class LoadAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)


# ---- responses -----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, texts: list[str], finish_reasons: list[str], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, finish_reasons))],
            "usage": usage_}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion(request_id: str, model: str, texts: list[str], finish_reasons: list[str], usage_: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(texts, finish_reasons))],
            "usage": usage_}


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, created: int, obj: str, usage_: dict) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def model_card(model_id: str, parent: str | None, created: int, max_model_len: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "lorakit", "root": model_id,
            "parent": parent, "max_model_len": max_model_len}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
