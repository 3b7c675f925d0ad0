"""Serving benchmark: many LoRA adapters on one base, batched, vs the base alone and vs one request at a time.

    lorakit bench serve                       # 8 adapters, 64 requests x 64 tokens on the embedded SmolLM2
    lorakit bench serve --quick               # a smoke run: 16 requests x 16 tokens, 1 repeat
    lorakit bench serve --kernel gathered     # one batched LoRA kernel for every pass
    lorakit bench serve --threads 1           # one torch thread (a busy shared machine)
    lorakit bench serve --dtype bfloat16      # every way in bf16 (as `lorakit serve --dtype bfloat16` serves)

The same requests (chat prompts from the demo data set; each asks for exactly --max-tokens tokens, end of
sequence ignored, so every way does the same work) are served three ways:

  mixed   lorakit's engine; the requests are spread over --adapters LoRA adapters (ranks from --ranks side
          by side), all in one continuously batched stream
  base    the same engine and requests, every request for the base model: the ceiling for `mixed`
  peft    one request at a time, activating its adapter first (set_adapter + generate), as a PEFT user
          does today: HuggingFace PEFT when installed, else lorakit's PeftModel (on --peft-requests of
          the requests: one at a time, the rate does not depend on how many)
  http    (not run by default) `mixed` through `lorakit serve` on a loopback port: streamed completions,
          one client thread per request, times taken by the client

Requests arrive all at once (--rate 0) or as a Poisson stream of --rate per second. Reported: generated
tokens per second (every token / time from the first arrival to the last token) and per CPU second of
this process (steadier on a busy machine), time to first token and latency (arrival to last token), p50
and p99, and the ratios mixed/base (target >= 0.8) and mixed/peft (target >= 4), by both clocks. Each way
runs --repeats times (the ways interleaved) after a warm-up; the median run is reported, with the machine's
load average, and each ratio is the median of the ratios of runs made one after the other (so that a
change of machine load between repeats does not skew it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import resources

from lorakit.bench import harness
from lorakit.serve.lora_ops import KERNEL_CHOICES

TARGET_BASE_RATIO, TARGET_PEFT_RATIO = 0.8, 4.0
WAYS = ("mixed", "base", "peft", "http")
FULL_DEFAULTS = {"requests": 64, "max_tokens": 64, "peft_requests": 16, "repeats": 3}
QUICK_DEFAULTS = {"requests": 16, "max_tokens": 16, "peft_requests": 4, "repeats": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="base model (default: the embedded smollm2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the base model's dtype in every way (default float32, as `lorakit serve`)")
    parser.add_argument("--adapters", type=int, default=8, metavar="N", help="LoRA adapters (default 8)")
    parser.add_argument("--ranks", default="8,16", metavar="R,R", help="adapter ranks, cycled (default 8,16)")
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj", metavar="M,M",
                        help="modules the adapters adapt (default q_proj,k_proj,v_proj,o_proj; or all-linear)")
    parser.add_argument("--requests", type=int, default=None, metavar="N", help="requests (default 64; --quick 16)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="tokens per answer (default 64; --quick 16)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="Poisson arrivals per second; 0 = all at once (default 0)")
    parser.add_argument("--max-batch", type=int, default=32, metavar="N", help="engine batch rows (default 32)")
    parser.add_argument("--kernel", choices=KERNEL_CHOICES, default="auto",
                        help="batched LoRA kernel (default auto: rows to decode, gathered to prefill)")
    parser.add_argument("--peft-requests", type=int, default=None, metavar="N",
                        help="requests served one at a time for the peft baseline (default 16; --quick 4)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="runs per way, the median is reported (default 3; --quick 1)")
    parser.add_argument("--ways", default="mixed,base,peft", metavar="W,W",
                        help=f"which ways to run, of {', '.join(WAYS)} (default mixed,base,peft)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: smaller defaults (see above)")
    parser.add_argument("--seed", type=int, default=0, help="adapter weights, arrival times, adapter choice")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads for every way (default: torch's default, one per core); on a busy "
                             "machine 1 avoids threads spinning while waiting for each other")
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON")


@dataclass
class RunResult:
    way: str
    tokens: int
    seconds: float
    ttft: list[float]
    latency: list[float]
    load: float  # 1-minute load average at the end of the run
    cpu_seconds: float = 0.0  # CPU time of this process (every thread) during the run
    batch_mean: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        """Tokens per second of CPU time this process used: what the run cost, whatever else the machine ran
        (on a busy shared machine wall-clock time mostly measures the other processes)."""
        return self.tokens / max(self.cpu_seconds, 1e-9)

    def summary(self) -> dict:
        return {"way": self.way, "tokens_per_second": round(self.tokens_per_second, 1), "tokens": self.tokens,
                "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "tokens_per_cpu_second": round(self.tokens_per_cpu_second, 1),
                "ttft_p50": _pct(self.ttft, 50), "ttft_p99": _pct(self.ttft, 99),
                "latency_p50": _pct(self.latency, 50), "latency_p99": _pct(self.latency, 99),
                "load_average": round(self.load, 2), "mean_decode_batch": self.batch_mean}


@dataclass
class Setup:
    model_name: str
    prompts: list[list[int]]
    adapter_dirs: dict[str, str] = field(default_factory=dict)


def run(args: argparse.Namespace) -> int:
    import torch

    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("adapters", "requests", "max_tokens", "max_batch", "peft_requests", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        raise ValueError(f"--ways: unknown {unknown}; choose from {', '.join(WAYS)}")
    ranks = [int(r) for r in args.ranks.split(",")]
    random.seed(args.seed)
    print(f"lorakit bench serve: {args.model} ({args.dtype}), {args.adapters} adapters (r {args.ranks} on "
          f"{args.target_modules}), "
          f"{args.requests} requests x {args.max_tokens} tokens, {'all at once' if not args.rate else f'{args.rate}/s'}"
          f", max batch {args.max_batch}, kernel {args.kernel}, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
        setup = _prepare(args, ranks, tmp)
        names = list(setup.adapter_dirs)
        assigned = [names[random.randrange(len(names))] for _ in setup.prompts]
        arrivals = _arrivals(len(setup.prompts), args.rate)
        runs: dict[str, list[RunResult]] = {way: [] for way in ways}
        probes = []  # the machine's state after each repeat (harness.probe_machine)
        for repeat in range(args.repeats):  # ways interleaved, so a change of machine load hits them alike
            for way in ways:
                if way == "peft":
                    count = min(args.peft_requests, len(setup.prompts))
                    result = _run_peft(args, setup, setup.prompts[:count], assigned[:count], arrivals[:count])
                elif way == "http":
                    result = _run_http(args, setup, assigned, arrivals)
                else:
                    adapters = assigned if way == "mixed" else [None] * len(assigned)
                    result = _run_engine(args, setup, way, adapters, arrivals)
                runs[way].append(result)
                print(f"  run {repeat + 1}, {way}: {result.tokens_per_second:.1f} tokens/s, "
                      f"{result.tokens_per_cpu_second:.1f} tokens/CPU-s (load {result.load:.2f})", flush=True)
            probes.append(harness.probe_machine())
            print(f"  run {repeat + 1}: {harness.probe_label(probes[-1])}", flush=True)
        results = {way: sorted(r, key=lambda r: r.tokens_per_second)[len(r) // 2] for way, r in runs.items()}
    report = {"machine": harness.machine(probes), **_report(results, runs)}
    print(harness.probe_report_line(report["machine"]["probe"]))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), **report}, fh, indent=2)
    return 0


def _prepare(args, ranks: list[int], tmp: str) -> Setup:
    """Random (non-zero) adapters saved in PEFT's format, and the chat-templated demo prompts."""
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.cli.common import chat_prompt_ids, prompt_encoder
    from lorakit.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    adapter_dirs = {}
    for i in range(args.adapters):
        torch.manual_seed(args.seed + i)
        config = LoraConfig(r=ranks[i % len(ranks)], lora_alpha=2 * ranks[i % len(ranks)], target_modules=targets,
                            init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.mul_(0.01)  # an adapter that changes the answers without wrecking them
        adapter_dirs[f"adapter-{i}"] = os.path.join(tmp, f"adapter-{i}")
        peft_model.save_pretrained(adapter_dirs[f"adapter-{i}"])
        model = peft_model.unload()
    encoder = prompt_encoder(tokenizer)
    demo = resources.files("lorakit") / "data" / "demo" / "test.jsonl"
    records = [json.loads(line) for line in demo.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for i in range(args.requests):
        messages = [m for m in records[i % len(records)]["messages"] if m["role"] != "assistant"]
        prompts.append(chat_prompt_ids(encoder, messages))
    return Setup(args.model, prompts, adapter_dirs)


def _arrivals(count: int, rate: float) -> list[float]:
    if not rate:
        return [0.0] * count
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += random.expovariate(rate)
    return times


def _run_engine(args, setup: Setup, way: str, adapters: list[str | None], arrivals: list[float]) -> RunResult:
    from lorakit.models import load_model_and_tokenizer
    from lorakit.serve.engine import Engine, EngineSettings, Sequence
    from lorakit.serve.sampling import SamplingParams

    model, tokenizer = load_model_and_tokenizer(setup.model_name, dtype=args.dtype)
    settings = EngineSettings(max_batch=args.max_batch, max_model_len=max(map(len, setup.prompts)) + args.max_tokens,
                              max_loras=max(args.adapters, 1), max_cpu_loras=max(args.adapters, 1),
                              kernel=args.kernel)
    engine = Engine(model, tokenizer, settings).start()
    try:
        for name in sorted({a for a in adapters if a is not None}):
            engine.adapters.load_now(name, setup.adapter_dirs[name])
        warm = sorted(set(adapters), key=str)  # every adapter once: in its compute slot, its first-use costs paid
        _drive(engine, Sequence, SamplingParams, setup.prompts[:len(warm)], warm, [0.0] * len(warm),
               min(4, args.max_tokens))  # within max_model_len, which allows --max-tokens after the longest prompt
        batches = engine.metrics.batch_size
        count0, sum0 = batches.count, batches.sum
        result = _drive(engine, Sequence, SamplingParams, setup.prompts, adapters, arrivals, args.max_tokens)
        result.way = way
        result.batch_mean = round((batches.sum - sum0) / max(batches.count - count0, 1), 1)
        return result
    finally:
        engine.stop()


def _drive(engine, sequence_cls, params_cls, prompts, adapters, arrivals, max_tokens) -> RunResult:
    """Submit the requests at their arrival times; wait for the last token."""
    n = len(prompts)
    arrived, first, done, tokens = [0.0] * n, [None] * n, [0.0] * n, [0] * n
    finished = threading.Semaphore(0)

    def on_output(i, output) -> None:  # the engine thread
        now = time.perf_counter()
        if first[i] is None and output.tokens:
            first[i] = now
        if output.finish_reason:
            done[i], tokens[i] = now, output.completion_tokens
            finished.release()

    params = params_cls(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if adapter is not None:
            engine.adapters.begin_request(adapter)
            engine.adapters.ensure_host(adapter)
        arrived[i] = time.perf_counter()
        engine.submit(sequence_cls(prompt, adapter, params, partial(on_output, i)))
    for _ in range(n):
        finished.acquire()
    return RunResult("", sum(tokens), max(done) - min(arrived), [f - a for f, a in zip(first, arrived)],
                     [d - a for d, a in zip(done, arrived)], os.getloadavg()[0], time.process_time() - cpu_start)


def _run_http(args, setup: Setup, adapters: list[str], arrivals: list[float]) -> RunResult:
    """`mixed` as clients see it: the server on a loopback port, one streamed request per client thread."""
    from lorakit.models import load_model_and_tokenizer
    from lorakit.serve.app import ServerSettings
    from lorakit.serve.engine import EngineSettings
    from lorakit.serve.server import ServerThread, build_server

    model, tokenizer = load_model_and_tokenizer(setup.model_name, dtype=args.dtype)
    engine_settings = EngineSettings(max_batch=args.max_batch, max_model_len=max(map(len, setup.prompts)) +
                                     args.max_tokens, max_loras=args.adapters, max_cpu_loras=args.adapters,
                                     kernel=args.kernel)
    used = {name: setup.adapter_dirs[name] for name in sorted(set(adapters))}
    server = build_server(model, tokenizer, ServerSettings("base", max_concurrent_requests=len(adapters) + 1,
                                                           max_tokens=args.max_tokens), engine_settings, used)
    n = len(adapters)
    arrived, first, done, tokens = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n

    def client(i: int, url: str, start: float) -> None:
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrived[i] = time.perf_counter()
        events = _stream_completion(url, {"model": adapters[i], "prompt": setup.prompts[i], "max_tokens":
                                          args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                                          "stream_options": {"include_usage": True}})
        for event in events:
            if not first[i] and event.get("choices") and event["choices"][0]["text"]:
                first[i] = time.perf_counter()
            if event.get("usage"):
                tokens[i] = event["usage"]["completion_tokens"]
        done[i] = time.perf_counter()

    try:
        with ServerThread(server.app) as url:
            for name in used:  # warm-up, as for `mixed`
                list(_stream_completion(url, {"model": name, "prompt": setup.prompts[0], "max_tokens": 4,
                                              "stream": True}))
            start, cpu_start = time.perf_counter(), time.process_time()
            threads = [threading.Thread(target=client, args=(i, url, start)) for i in range(n)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            cpu = time.process_time() - cpu_start  # server and clients: they share this process
    finally:
        server.close()
    return RunResult("http", sum(tokens), max(done) - min(arrived), [f - a for f, a in zip(first, arrived)],
                     [d - a for d, a in zip(done, arrived)], os.getloadavg()[0], cpu)


def _stream_completion(url: str, body: dict):
    """The JSON events of one streamed completion (stdlib HTTP: the benchmark needs no client library)."""
    import http.client
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
        for line in response:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                yield json.loads(line[6:])
    finally:
        connection.close()


def _run_peft(args, setup: Setup, prompts, adapters, arrivals) -> RunResult:
    """One request at a time: activate its adapter, generate (fixed length), next."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from lorakit.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(setup.model_name, dtype=args.dtype)
    peft_model = _peft_model(model, setup.adapter_dirs)
    peft_model.eval()

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.at = 0, None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:  # the first put is the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def generate(prompt, adapter, max_tokens):
        peft_model.set_adapter(adapter)
        ids = torch.tensor([prompt])
        streamer = FirstToken()
        with torch.inference_mode():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                                      pad_token_id=tokenizer.pad_token_id)
        return streamer.at, out.shape[1] - len(prompt)

    generate(prompts[0], adapters[0], 4)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    ttft, latency, tokens, end = [], [], 0, start
    for prompt, adapter, arrival in zip(prompts, adapters, arrivals):
        arrived = start + arrival
        if time.perf_counter() < arrived:
            time.sleep(arrived - time.perf_counter())
        first, count = generate(prompt, adapter, args.max_tokens)
        end = time.perf_counter()
        ttft.append(first - arrived)
        latency.append(end - arrived)
        tokens += count
    return RunResult("peft", tokens, end - start, ttft, latency, os.getloadavg()[0], time.process_time() - cpu_start)


def _peft_model(model, adapter_dirs: dict[str, str]):
    """HuggingFace PEFT's PeftModel with every adapter loaded, or lorakit's when PEFT is not installed."""
    names = list(adapter_dirs)
    try:
        from peft import PeftModel
    except ImportError:
        from lorakit import PeftModel
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapter_dirs[name], adapter_name=name)
    print(f"  peft baseline: {type(peft_model).__module__}.{type(peft_model).__name__}", flush=True)
    return peft_model


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))], 3)


def _report(results: dict[str, RunResult], runs: dict[str, list[RunResult]]) -> dict:
    rows = {way: r.summary() for way, r in results.items()}
    print(f"\n{'way':<8}{'tokens/s':>10}{'tok/CPU-s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'lat p50':>10}"
          f"{'lat p99':>10}{'batch':>7}{'load':>7}")
    for way, row in rows.items():
        print(f"{way:<8}{row['tokens_per_second']:>10.1f}{row['tokens_per_cpu_second']:>11.1f}{row['ttft_p50']:>10.3f}"
              f"{row['ttft_p99']:>10.3f}{row['latency_p50']:>10.3f}{row['latency_p99']:>10.3f}"
              f"{row['mean_decode_batch'] if row['mean_decode_batch'] is not None else '-':>7}"
              f"{row['load_average']:>7.2f}")
    # ratios of runs made one after the other (same machine load), the median over repeats
    ratios = {}
    for other, target, label in (("base", TARGET_BASE_RATIO, "mixed / base"),
                                 ("peft", TARGET_PEFT_RATIO, "mixed / peft one at a time"),
                                 ("http", 0, "mixed / http (the HTTP layer's cost)")):
        if "mixed" in runs and other in runs:
            paired = sorted(m.tokens_per_second / o.tokens_per_second for m, o in zip(runs["mixed"], runs[other]))
            ratios[f"mixed_over_{other}"] = round(paired[len(paired) // 2], 3)
            each = ", ".join(f"{r:.2f}" for r in paired)
            cpu = sorted(m.tokens_per_cpu_second / o.tokens_per_cpu_second for m, o in zip(runs["mixed"], runs[other]))
            ratios[f"mixed_over_{other}_cpu"] = round(cpu[len(cpu) // 2], 3)
            goal = f"target >= {target:g}; " if target else ""
            print(f"{label} = {ratios[f'mixed_over_{other}']:.2f} ({goal}each repeat: {each}); per CPU second "
                  f"{ratios[f'mixed_over_{other}_cpu']:.2f} (each repeat: {', '.join(f'{r:.2f}' for r in cpu)})")
    return {"results": rows, "ratios": ratios, "raw": {way: [asdict(r) for r in rs] for way, rs in runs.items()}}
