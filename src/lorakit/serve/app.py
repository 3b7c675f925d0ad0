"""The HTTP API: OpenAI's chat completions, completions and models, vLLM's adapter loading, health, metrics,
and the playground page.

    app = create_app(engine, tokenizer, ServerSettings(served_model_name="smollm2"))

The request's `model` picks what answers: the base model's name, or an adapter's name. Errors have
OpenAI's shape ({"error": {"message", "type", "param", "code"}}) and status: 400 bad request, 401 no
or wrong API key, 403 runtime loading disabled, 404 unknown model, 409 adapter busy, 413 body too large,
429 too many requests in flight, 503 engine stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from lorakit.cli.common import chat_prompt_ids, prompt_encoder
from lorakit.eval.generation import check_prompts
from lorakit.serve import openai_api as api
from lorakit.serve.adapter_cache import AdapterInUse, AdapterNotFound
from lorakit.serve.adapter_weights import AdapterLoadError
from lorakit.serve.engine import Engine, EngineStopped
from lorakit.serve.jobs import GenerationFailed, Job
from lorakit.serve.metrics import AccessLog
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.security import ApiKeyCheck, BodySizeLimit, PathRefused, check_adapter_name, confined_adapter_dir
from lorakit.train.data_formats import Completion

log = logging.getLogger("lorakit.serve")


@dataclass(frozen=True)
class ServerSettings:
    # The `model` name that means the base model without adapter.
    served_model_name: str
    # Bearer token required on /v1/ and /metrics; None = open.
    api_key: str | None = None
    # Runtime loading (POST /v1/load_lora_adapter) reads adapters from here only; None = disabled.
    adapter_dir: str | None = None
    # Most tokens a request may ask to generate (max_tokens) and the default of chat requests without it.
    max_tokens: int = 1024
    default_max_tokens: int = 256
    # Most prompt tokens; None = whatever fits the engine's max_model_len.
    max_prompt_tokens: int | None = None
    # Generation requests in flight at once (more get 429), sequences per request (prompts x n), body bytes.
    max_concurrent_requests: int = 256
    max_choices: int = 16
    max_body_bytes: int = 1_000_000
    # How long an unload waits for the requests that use the adapter.
    unload_timeout: float = 60.0
    # Chat template: auto, tokenizer, alpaca (as `lorakit generate --template`).
    template: str = "auto"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def create_app(engine: Engine, tokenizer, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(engine, tokenizer, settings)
    app.state.server = server
    _add_error_handlers(app)
    static = resources.files("lorakit.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.served_model_name, "running": engine.running,
                "waiting": engine.waiting, "adapters": engine.adapters.stats(),
                "api_key_required": settings.api_key is not None}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        created = server.created
        limit = engine.settings.max_model_len
        cards = [api.model_card(settings.served_model_name, None, created, limit)]
        cards += [api.model_card(name, settings.served_model_name, created, limit) for name in engine.adapters.names()]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatCompletionRequest, request: Request):
        return await server.generate(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        return await server.generate(body, request, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: api.LoadAdapterRequest, request: Request) -> PlainTextResponse:
        request.state.log.update(adapter=body.lora_name)
        await server.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: api.UnloadAdapterRequest, request: Request) -> PlainTextResponse:
        request.state.log.update(adapter=body.lora_name)
        try:
            await run_in_threadpool(engine.adapters.unload, body.lora_name, settings.unload_timeout)
        except AdapterNotFound as err:
            raise ApiError(404, str(err), "lora_name", "model_not_found") from None
        except AdapterInUse as err:
            raise ApiError(409, str(err), "lora_name", "adapter_in_use") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # each add_middleware wraps the ones before: the access log is outermost and sees every answer (401, 413)
    if settings.api_key:
        app.add_middleware(ApiKeyCheck, api_key=settings.api_key)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    routes = frozenset(route.path for route in app.routes if not route.path.startswith("/static"))
    app.add_middleware(AccessLog, metrics=engine.metrics, routes=routes)
    return app


class _Server:
    """The request handling behind the routes."""

    def __init__(self, engine: Engine, tokenizer, settings: ServerSettings) -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.encoder = prompt_encoder(tokenizer, settings.template)
        self.in_flight = 0
        self.created = int(time.time())

    # ---- generation ------------------------------------------------------------------------------------------
    async def generate(self, body: api.GenerationRequest, request: Request, chat: bool):
        settings = self.settings
        request.state.log.update(model=body.model, stream=bool(body.stream))
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, f"not supported by lorakit serve: {', '.join(unsupported)}", unsupported[0])
        adapter = self._adapter_for(body.model)
        prompts = self._chat_prompt(body) if chat else self._completion_prompts(body)
        params = self._sampling_params(body, chat, max(len(p) for p in prompts))
        n = body.n or 1
        if len(prompts) * n > settings.max_choices:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} asks for {len(prompts) * n} answers; at most "
                                f"{settings.max_choices} per request", "n")
        stop = self._stop(body)
        if self.in_flight >= settings.max_concurrent_requests:
            raise ApiError(429, f"the server is at its limit of {settings.max_concurrent_requests} requests in "
                                "flight; retry shortly", code="too_many_requests")
        job = Job(self.engine, self.tokenizer, adapter, prompts, params, n, stop)
        self.in_flight += 1
        try:
            await self._start(job)
        except BaseException:
            self.in_flight -= 1
            raise
        request_id = api.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._sse(job, request_id, body.model, chat, include_usage, request)
            return _JobStream(events, job, self._done, media_type="text/event-stream",
                              headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            return await self._collect(job, request_id, body.model, chat, request)
        finally:
            self._done(job)

    def _done(self, job: Job) -> None:
        job.cancel()
        self.in_flight -= 1

    async def _start(self, job: Job) -> None:
        try:
            await job.start()
        except AdapterNotFound as err:
            raise ApiError(404, str(err), "model", "model_not_found") from None
        except AdapterLoadError as err:
            raise ApiError(400, str(err), "model", "adapter_unavailable") from None
        except EngineStopped as err:
            raise ApiError(503, str(err)) from None

    async def _collect(self, job: Job, request_id: str, model: str, chat: bool, request: Request):
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        texts = [""] * len(job.choices)
        reasons = [""] * len(job.choices)
        try:
            async for event in job.events():
                texts[event.index] += event.text
                if event.finish_reason:
                    reasons[event.index] = event.finish_reason
        except GenerationFailed as err:
            raise ApiError(500, str(err)) from None
        finally:
            watcher.cancel()
            request.state.log.update(job.log_fields())
        usage = api.usage(job.prompt_tokens, job.completion_tokens)
        build = api.chat_completion if chat else api.completion
        return build(request_id, model, texts, reasons, usage)

    async def _sse(self, job: Job, request_id: str, model: str, chat: bool, include_usage: bool, request: Request):
        created = int(time.time())
        try:
            if chat:
                for index in range(len(job.choices)):
                    yield _sse(api.chat_chunk(request_id, model, created, index, {"role": "assistant", "content": ""}))
            async for event in job.events():
                if chat:
                    delta = {"content": event.text} if event.text else {}
                    if delta:
                        yield _sse(api.chat_chunk(request_id, model, created, event.index, delta))
                    if event.finish_reason:
                        yield _sse(api.chat_chunk(request_id, model, created, event.index, {}, event.finish_reason))
                else:
                    yield _sse(api.completion_chunk(request_id, model, created, event.index, event.text,
                                                    event.finish_reason))
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(api.usage_chunk(request_id, model, created, obj,
                                           api.usage(job.prompt_tokens, job.completion_tokens)))
            yield "data: [DONE]\n\n"
        except GenerationFailed as err:
            yield _sse(api.error_body(500, str(err)))
            yield "data: [DONE]\n\n"
        finally:
            request.state.log.update(job.log_fields())

    # ---- request pieces ---------------------------------------------------------------------------------------
    def _adapter_for(self, model: str) -> str | None:
        if model == self.settings.served_model_name:
            return None
        if model not in self.engine.adapters:
            raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the base model "
                                f"({self.settings.served_model_name!r}) and the adapters", "model",
                           "model_not_found")
        return model

    def _chat_prompt(self, body: api.ChatCompletionRequest) -> list[list[int]]:
        messages = [m.as_template_message() for m in body.messages]
        try:
            ids = chat_prompt_ids(self.encoder, messages, "messages")
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None
        return [self._check_prompt_length(ids, "messages")]

    def _completion_prompts(self, body: api.CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append(self.encoder.generation_prompt(Completion(prompt=item, completion=""), "prompt")[0])
            else:
                prompts.append(list(item))
        try:
            prompts = check_prompts(self.engine.model, prompts)
        except ValueError as err:
            raise ApiError(400, str(err).replace("prompt_ids", "prompt"), "prompt") from None
        return [self._check_prompt_length(p, "prompt") for p in prompts]

    def _check_prompt_length(self, ids: list[int], param: str) -> list[int]:
        limit = self.settings.max_prompt_tokens or self.engine.settings.max_model_len - 1
        if not ids:
            raise ApiError(400, "the prompt is empty", param)
        if len(ids) > limit:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}", param,
                           "context_length_exceeded")
        return ids

    def _sampling_params(self, body: api.GenerationRequest, chat: bool, longest_prompt: int) -> SamplingParams:
        settings = self.settings
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = self.engine.settings.max_model_len - longest_prompt
        if max_tokens is None:
            # OpenAI's defaults: 16 for completions; for chat, as much as fits (here, up to a server default)
            max_tokens = min(settings.default_max_tokens if chat else 16, room, settings.max_tokens)
        elif max_tokens > settings.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {settings.max_tokens}",
                           "max_tokens")
        try:
            self.engine.check_fits(longest_prompt, max(max_tokens, 1))
            return SamplingParams(max_tokens=max(max_tokens, 1),
                                  temperature=1.0 if body.temperature is None else body.temperature,
                                  top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                                  ignore_eos=body.ignore_eos)
        except ValueError as err:
            raise ApiError(400, str(err), "max_tokens", "context_length_exceeded") from None

    def _stop(self, body: api.GenerationRequest) -> list[str]:
        try:
            return body.stop_strings()
        except ValueError as err:
            raise ApiError(400, str(err), "stop") from None

    # ---- adapters at run time -----------------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        if self.settings.adapter_dir is None:
            raise ApiError(403, "loading adapters at run time is disabled; start the server with --adapter-dir DIR "
                                "and give lora_path relative to it", "lora_path", "runtime_loading_disabled")
        try:
            check_adapter_name(name)
            if name == self.settings.served_model_name:
                raise ValueError(f"{name!r} is the base model's name")
            directory = confined_adapter_dir(self.settings.adapter_dir, path)
        except PathRefused as err:
            raise ApiError(400, str(err), "lora_path", "invalid_path") from None
        except ValueError as err:
            raise ApiError(400, str(err), "lora_name") from None
        try:
            await run_in_threadpool(self.engine.adapters.load_now, name, directory)
        except AdapterLoadError as err:
            raise ApiError(400, str(err), "lora_path", "adapter_unavailable") from None
        except ValueError as err:
            raise ApiError(400, str(err), "lora_name", "adapter_exists") from None
        log.info("adapter %s loaded from %s", name, directory)


class _JobStream(StreamingResponse):
    """A streamed answer whose job is cancelled and counted out however the response ends (finished, client
    gone, or never started because the client left at once)."""

    def __init__(self, content, job: Job, on_end, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.job, self.on_end = job, on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end(self.job)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client closes the connection before its (non-streamed) answer is ready."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        _log_error(request, err.message)
        return JSONResponse(api.error_body(err.status, err.message, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
            where = ""
        _log_error(request, message)
        return JSONResponse(api.error_body(400, message, where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = str(err.detail)
        _log_error(request, message)
        return JSONResponse(api.error_body(err.status_code, message), status_code=err.status_code,
                            headers=getattr(err, "headers", None))


def _log_error(request: Request, message: str) -> None:
    log_fields = getattr(request.state, "log", None)
    if isinstance(log_fields, dict):
        log_fields["error"] = message

