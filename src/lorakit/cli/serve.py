"""Serve one base model and many LoRA adapters over an OpenAI-compatible HTTP API, batched together.

    lorakit serve --adapter demo=runs/demo-20261122-153000       # the embedded SmolLM2 + `lorakit demo`'s adapter
    lorakit serve --model ./my-base --adapter-dir adapters/ --max-loras 8 --port 8000
    LORAKIT_API_KEY=secret lorakit serve --adapter a=runs/a --adapter b=runs/b --host 0.0.0.0

A request's `model` field picks the base model (its name, by default the --model value) or an adapter
(its name). Requests for different adapters run in one continuously changing batch: the base model's
weights are shared and each token adds its own adapter's low-rank update; nothing is merged.

Routes: POST /v1/chat/completions, POST /v1/completions (both stream with "stream": true), GET /v1/models,
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"} (with
--adapter-dir; lora_path relative to it), GET /health, GET /metrics (Prometheus), and a playground page at /.
Adapters from --adapter are read at start; those found in --adapter-dir (one directory per adapter, named
after it) when first used. --max-loras adapters are kept in compute slots, --max-cpu-loras in host memory.
With an API key (--api-key or $LORAKIT_API_KEY), /v1/ and /metrics need "Authorization: Bearer KEY".
One JSON line per request goes to stderr. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lorakit.cli.common import check_positive_option
from lorakit.models.loading import DTYPES
from lorakit.serve.lora_ops import KERNEL_CHOICES
from lorakit.train.templates import TEMPLATES

DEFAULT_MODEL = "smollm2"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, metavar="M",
                       help=f"base model: embedded alias, model directory or Hub id (default {DEFAULT_MODEL})")
    model.add_argument("--served-model-name", metavar="NAME",
                       help="the `model` name that means the base model (default: the --model value's last part)")
    model.add_argument("--dtype", choices=[d for d in DTYPES if d], default=None,
                       help="dtype of the weights (default float32)")
    model.add_argument("--template", choices=TEMPLATES, default="auto",
                       help="chat template for /v1/chat/completions (default auto: the tokenizer's, else Alpaca-style)")
    adapters = parser.add_argument_group("adapters")
    adapters.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                          help="serve the adapter in DIR (or a training run's output_dir) as NAME; repeatable")
    adapters.add_argument("--adapter-dir", metavar="DIR",
                          help="serve every adapter directory inside DIR (named after it, read on first use) and "
                               "allow POST /v1/load_lora_adapter from DIR")
    adapters.add_argument("--max-loras", type=int, default=8, metavar="N",
                          help="adapters resident in compute memory at once (default 8)")
    adapters.add_argument("--max-cpu-loras", type=int, default=64, metavar="N",
                          help="adapters kept in host memory (>= --max-loras, default 64)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument("--api-key", metavar="KEY", default=None,
                        help="require this bearer token (default: $LORAKIT_API_KEY, else no key)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=32, metavar="N",
                        help="sequences generated at once (default 32)")
    limits.add_argument("--max-model-len", type=int, default=None, metavar="N",
                        help="prompt + answer tokens per sequence (default: the model's context, at most 2048)")
    limits.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                        help="most tokens a request may generate (default 1024)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                        help="longest prompt accepted (default: whatever fits --max-model-len)")
    limits.add_argument("--max-concurrent-requests", type=int, default=256, metavar="N",
                        help="generation requests in flight; more get 429 (default 256)")
    limits.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N",
                        help="largest request body; larger gets 413 (default 1000000)")
    limits.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                        help="prompt tokens per sequence per step; longer prompts are split (default 256)")
    limits.add_argument("--kernel", choices=KERNEL_CHOICES, default="auto",
                        help="batched LoRA kernel (default auto: rows to decode, gathered to prefill)")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """["name=dir", ...] -> {name: adapter directory}; ValueError on a malformed or duplicate entry."""
    from lorakit.adapter_files import resolve_adapter_dir
    from lorakit.serve.security import check_adapter_name

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter demo=runs/demo")
        check_adapter_name(name)
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = resolve_adapter_dir(path)
    return adapters


def run(args: argparse.Namespace) -> int:
    from lorakit.models import load_model_and_tokenizer
    from lorakit.serve.app import ServerSettings
    from lorakit.serve.engine import EngineSettings
    from lorakit.serve.security import API_KEY_ENV
    from lorakit.serve.server import bind, build_server, configure_access_log, run as run_server
    from lorakit.train.runtime import allocator_name

    for option in ("max_loras", "max_cpu_loras", "max_batch", "max_model_len", "max_tokens", "max_prompt_tokens",
                   "max_concurrent_requests", "max_body_bytes", "prefill_chunk"):
        check_positive_option("--" + option.replace("_", "-"), getattr(args, option))
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    adapters = parse_adapters(args.adapter)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    sock = bind(args.host, args.port)  # before the slow model load: a busy port fails at once
    model, tokenizer = load_model_and_tokenizer(args.model, "CAUSAL_LM", dtype=args.dtype)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    max_model_len = args.max_model_len or min(context, 2048)
    engine_settings = EngineSettings(max_batch=args.max_batch, max_model_len=max_model_len,
                                     prefill_chunk=args.prefill_chunk, prefill_tokens=max(1024, args.prefill_chunk),
                                     max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, kernel=args.kernel)
    settings = ServerSettings(
        served_model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
        api_key=api_key, adapter_dir=args.adapter_dir, max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens, max_concurrent_requests=args.max_concurrent_requests,
        max_body_bytes=args.max_body_bytes, template=args.template)
    logging.getLogger("lorakit.serve").setLevel(logging.INFO)
    server = build_server(model, tokenizer, settings, engine_settings, adapters)
    configure_access_log()
    host, port = sock.getsockname()[:2]
    stats = server.engine.adapters.stats()
    print(f"lorakit serve: {settings.served_model_name} with {stats['registered']} adapter(s) on "
          f"http://{host if ':' not in host else f'[{host}]'}:{port} (playground at /, API at /v1; "
          f"malloc: {allocator_name()})",
          file=sys.stderr, flush=True)
    if args.host not in LOOPBACK and api_key is None:
        print(f"lorakit serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              f"port can use the server (set --api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
    try:
        run_server(server.app, sock)
    finally:
        server.close()
    return 0
