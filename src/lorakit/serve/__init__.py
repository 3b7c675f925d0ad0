"""lorakit serve: one frozen base model, many LoRA adapters, an OpenAI-compatible HTTP API.

Requests for different adapters share one continuously batched stream (S-LoRA,
https://arxiv.org/abs/2311.03285): the base model's matmuls are shared by every row, each row adds its own
adapter's low-rank update from stacked weights, and adapters move between disk, host memory and compute
slots under budgets. docs/serving.md is the user guide.

    lora_ops.py        the serving LoRA layer (stacked, zero-padded adapters; gathered / segmented kernels)
    kv_cache.py        the slot KV cache and the layout of one forward pass
    engine.py          the scheduler thread: admission, chunked prefill, decoding, finishing
    sampling.py        greedy / temperature / top-p per sequence, with seeds
    adapter_weights.py reading and checking one adapter (what can be batched)
    adapter_cache.py   the registry and the host / compute tiers with LRU budgets
    text.py            token ids -> streamed text with stop strings
    jobs.py            one HTTP request's sequences, as text events
    openai_api.py      request and response shapes of the OpenAI API
    app.py             the FastAPI routes
    security.py        API key, confined adapter paths, body limit
    metrics.py         Prometheus metrics and the JSON access log
    server.py          building a server and running uvicorn
    static/            the playground page
"""
