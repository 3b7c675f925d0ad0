"""The serving engine: continuous batching of sequences that use different adapters, on one frozen base.

One scheduler thread owns the model. Each iteration it

1. drops cancelled sequences (a client went away) and admits waiting ones: a sequence needs a free KV
   cache row and, when it names an adapter, a compute slot holding that adapter (adapter_cache.py);
2. runs one prefill pass over the sequences whose prompts are not in the cache yet: at most
   `prefill_chunk` prompt tokens per sequence and `prefill_tokens` per pass, so a long prompt is split
   over several iterations and never stalls the others for long; a sequence whose prompt is complete
   samples its first token;
3. runs one decoding pass over every sequence that has a token to feed back, whatever its adapter.

Sequences join and leave between passes; nothing waits for a batch to finish. The base matmuls are shared
by all rows of a pass; each row's low-rank update comes from its adapter's slot (lora_ops.py), and its
attention reads its own row of the KV cache (kv_cache.py).

Results go back through each sequence's `on_output` callback, called on the engine thread: the HTTP
layer hands them to its event loop.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lorakit.cache_argument import cache_argument
from lorakit.eval.generation import stop_token_ids
from lorakit.ops.lm_head import head_to_lorakit_matmul
from lorakit.serve.adapter_cache import AdapterCache
from lorakit.serve.adapter_weights import ModelLayers, ServingAdapter
from lorakit.serve.kv_cache import RowWork, SlotKVCache, build_layout
from lorakit.serve.lora_ops import BASE_SLOT, KERNEL_CHOICES, BatchAdapters, ServingLoraLinear, wrap_linear
from lorakit.serve.metrics import Metrics
from lorakit.serve.sampling import SamplingParams, sample_rows

log = logging.getLogger("lorakit.serve")


@dataclass(frozen=True)
class EngineSettings:
    # Sequences running at once (rows of the KV cache).
    max_batch: int = 32
    # Prompt plus generated tokens of one sequence.
    max_model_len: int = 2048
    # Prompt tokens of one sequence per prefill pass (longer prompts take several passes).
    prefill_chunk: int = 256
    # Tokens per prefill pass over all its sequences (rows x padded chunk width).
    prefill_tokens: int = 1024
    # Compute slots for adapters (S-LoRA's GPU budget) and host copies (its CPU budget).
    max_loras: int = 8
    max_cpu_loras: int = 64
    # The batched LoRA kernel (lora_ops.py): "auto" (per pass), "rows", "segmented" or "gathered".
    kernel: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_model_len", "prefill_chunk", "prefill_tokens", "max_loras", "max_cpu_loras"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prefill_tokens < self.prefill_chunk:
            raise ValueError(f"prefill_tokens ({self.prefill_tokens}) must be >= prefill_chunk ({self.prefill_chunk})")
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {self.kernel!r}")


@dataclass
class Output:
    """What one engine step produced for one sequence."""

    tokens: list[int]  # new tokens to show (a stop token is counted but not shown)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    completion_tokens: int = 0  # all tokens generated so far (stop token included)
    error: str | None = None


class Sequence:
    """One generation: a prompt, an adapter (None = the base model), sampling settings, where results go."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], adapter: str | None, params: SamplingParams,
                 on_output: Callable[[Output], None]) -> None:
        self.id = next(self._ids)
        self.prompt, self.adapter, self.params, self.on_output = list(prompt), adapter, params, on_output
        self.arrival = time.monotonic()
        self.cancelled = False
        # engine thread state
        self.row: int | None = None
        self.slot: int | None = None
        self.cached = 0  # tokens of this sequence in the KV cache
        self.generated: list[int] = []
        self.generator = params.generator()
        self.blocked_rounds = 0  # admission rounds spent waiting for an adapter slot


class EngineStopped(RuntimeError):
    pass


class Engine:
    def __init__(self, model: nn.Module, tokenizer, settings: EngineSettings = EngineSettings(),
                 metrics: Metrics | None = None) -> None:
        _check_model(model)
        self.model = model.eval().requires_grad_(False)
        head_to_lorakit_matmul(model)  # the last positions: one contiguous matmul on lorakit's kernels (ops/lm_head.py)
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids, default=0)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.layers = ModelLayers(model)  # before any layer is wrapped
        self.adapters = AdapterCache(self.layers, settings.max_loras, settings.max_cpu_loras, self.metrics)
        self.adapters.slot_writer = self._write_slot
        self.batch = BatchAdapters(settings.kernel)
        self.serving_layers: dict[str, ServingLoraLinear] = {}
        self.kv = SlotKVCache(settings.max_batch, settings.max_model_len)
        self._cache_keyword = cache_argument(model.forward)  # "cache" from transformers 5.24 (cache_argument.py)
        self._free_rows = list(range(settings.max_batch))
        self._incoming: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fallback_generator = torch.Generator().manual_seed(torch.seed())
        self.metrics.add_gauge("lorakit_queue_depth", "sequences waiting to be admitted", lambda: self.waiting)
        self.metrics.add_gauge("lorakit_running_sequences", "sequences in the running batch", lambda: self.running)
        self.metrics.add_gauge("lorakit_kv_cache_bytes", "memory held by the KV cache", self.kv.memory_bytes)
        for tier in ("registered", "host", "compute"):
            self.metrics.add_gauge(f"lorakit_adapters_{tier}", f"adapters {tier}",
                                   lambda tier=tier: self.adapters.stats()[tier])

    # ---- the public side (any thread) --------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="lorakit-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.settings.max_model_len
        if prompt_tokens + max_tokens > limit:
            raise ValueError(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, more than the "
                             f"{limit} tokens a sequence may hold; shorten the prompt or lower max_tokens")

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (its adapter lease is already taken; the engine returns it when the sequence ends)."""
        self.check_fits(len(seq.prompt), seq.params.max_tokens)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineStopped("the engine is not running")
            self._incoming.append(seq)
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        with self._cond:
            seq.cancelled = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until predicate() holds (checked after every engine step); False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping or self._incoming or self._waiting or self._running)
                    if self._stopping:
                        break
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001 - one bad step fails its sequences, not the server
                    log.exception("engine step failed")
                    for seq in list(self._running):
                        self._finish(seq, "error", error=f"generation failed: {type(err).__name__}: {err}")
                with self._cond:
                    self._cond.notify_all()
        with self._cond:
            for seq in [*self._running, *self._waiting, *self._incoming]:
                self._finish(seq, "error", error="the server is shutting down")

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        prefill = [s for s in self._running if s.cached < len(s.prompt)]
        if prefill:
            self._prefill(prefill)
        decode = [s for s in self._running if s.cached >= len(s.prompt)]
        if decode:
            self._decode(decode)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self._running, *self._waiting) if s.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        """FIFO; a sequence whose adapter finds no free slot waits, and the ones behind it may only use adapters
        already in a slot. After `max_batch` such rounds nothing passes it any more (no starvation)."""
        blocked = None
        for seq in list(self._waiting):
            if not self._free_rows or (blocked is not None and blocked.blocked_rounds > self.settings.max_batch):
                break
            try:
                slot = BASE_SLOT if seq.adapter is None else self.adapters.acquire_slot(seq.adapter, blocked is None)
            except Exception as err:  # noqa: BLE001 - this sequence cannot run; the others can
                log.exception("putting adapter %s into a compute slot failed", seq.adapter)
                self._finish(seq, "error", error=f"adapter {seq.adapter!r} could not be made resident: {err}")
                continue
            if slot is None:
                seq.blocked_rounds += 1
                blocked = blocked or seq
                continue
            self._waiting.remove(seq)
            seq.slot, seq.row = slot, self._free_rows.pop(0)
            self._running.append(seq)

    def _prefill(self, seqs: list[Sequence]) -> None:
        chosen: list[tuple[Sequence, int]] = []
        width = 0
        for seq in seqs:
            count = min(self.settings.prefill_chunk, len(seq.prompt) - seq.cached)
            if chosen and max(width, count) * (len(chosen) + 1) > self.settings.prefill_tokens:
                break
            chosen.append((seq, count))
            width = max(width, count)
        work = [RowWork(s.row, s.cached, s.prompt[s.cached:s.cached + n]) for s, n in chosen]
        logits = self._forward(work, [s.slot for s, _ in chosen])
        self.metrics.prefill_batch_tokens.observe(sum(n for _, n in chosen))
        done = []
        for i, (seq, count) in enumerate(chosen):
            seq.cached += count
            if seq.cached == len(seq.prompt):
                done.append(i)
                self.metrics.prompt_tokens.inc(len(seq.prompt))
        if done:
            ready = [chosen[i][0] for i in done]
            self._emit(ready, logits[done])

    def _decode(self, seqs: list[Sequence]) -> None:
        seqs = sorted(seqs, key=lambda s: s.row)  # consecutive rows read the cache without a copy
        work = [RowWork(s.row, s.cached, [s.generated[-1]]) for s in seqs]
        logits = self._forward(work, [s.slot for s in seqs])
        for seq in seqs:
            seq.cached += 1
        self.metrics.batch_size.observe(len(seqs))
        self._emit(seqs, logits)

    def _forward(self, work: list[RowWork], slots: list[int]) -> torch.Tensor:
        """Last-position logits (n, V) of one pass over the given cache rows."""
        layout = build_layout(work, self.pad_id, self.kv.scratch_row, self.dtype, self.device)
        self.kv.ensure_capacity(layout.kv_len)
        self.kv.layout = layout
        self.batch.set(slots, layout.input_ids.shape[1], self.device)
        try:
            out = self.model(input_ids=layout.input_ids, attention_mask=layout.attention_mask,
                             position_ids=layout.position_ids, use_cache=True, **{self._cache_keyword: self.kv},
                             logits_to_keep=1)
        finally:
            self.kv.layout = None
            self.batch.clear()
        return out.logits[:, -1]

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs], self._fallback_generator)
        now = time.monotonic()
        self.metrics.tokens_generated(len(seqs))
        for seq, token in zip(seqs, tokens):
            if not seq.generated:
                self.metrics.ttft.observe(now - seq.arrival)
            seq.generated.append(token)
            stop = token in self.stop_ids and not seq.params.ignore_eos
            if stop:
                self._finish(seq, "stop")
            elif len(seq.generated) >= seq.params.max_tokens or seq.cached + 1 >= self.settings.max_model_len:
                self._finish(seq, "length", shown=[token])
            else:
                seq.on_output(Output([token], completion_tokens=len(seq.generated)))

    def _finish(self, seq: Sequence, reason: str, shown: list[int] | None = None, error: str | None = None) -> None:
        """Take the sequence out of the engine, return its row, slot and lease, and tell its owner."""
        if seq in self._running:
            self._running.remove(seq)
            self._free_row(seq.row)
            if seq.adapter is not None:
                self.adapters.release_slot(seq.adapter)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        elif seq in self._incoming:
            self._incoming.remove(seq)
        if seq.adapter is not None:
            self.adapters.end_request(seq.adapter)
        self.metrics.finished.inc(reason=reason)
        self.metrics.latency.observe(time.monotonic() - seq.arrival)
        try:
            seq.on_output(Output(shown or [], reason, len(seq.generated), error))
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
            log.exception("delivering the end of sequence %d failed", seq.id)

    def _free_row(self, row: int) -> None:
        """Return a cache row, moving the sequence in the highest row into it: running sequences stay in rows
        0..n-1, so passes read the cache as views (copying one row now is far cheaper than copying every
        row's keys and values at every step)."""
        last = max(self._running, key=lambda s: s.row, default=None)
        if last is not None and last.row > row:
            self.kv.move_row(last.row, row, last.cached)
            row, last.row = last.row, row
        self._free_rows.append(row)
        self._free_rows.sort()

    # ---- adapter slots (called by the adapter cache, on this thread) --------------------------------------------
    def _write_slot(self, slot: int, adapter: ServingAdapter) -> None:
        for name in adapter.modules:
            if name not in self.serving_layers:
                self.serving_layers[name] = wrap_linear(self.model, name, self.adapters.num_slots, self.batch)
        for name, layer in self.serving_layers.items():
            layer.write_slot(slot, *adapter.modules.get(name, (None, None)))


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError("lorakit serve needs a decoder-only causal language model (Llama, Qwen2, GPT-2, ...)")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"lorakit serve supports full-attention models only; this one has layer types "
                         f"{sorted(set(layer_types))}")
