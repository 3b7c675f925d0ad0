"""Which adapters the server knows, and where each one is: on disk, in host memory, in a compute slot.

S-LoRA's memory hierarchy (https://arxiv.org/abs/2311.03285, Sec. 4) with two budgets:

    registered (any number; a name and a directory, nothing read)
      -> host memory: parsed and checked (ServingAdapter), at most `max_cpu_loras` (>= max_loras), least
         recently used goes first -- except adapters in a compute slot or used by queued or running requests,
         which stay (so the budget can be exceeded while more distinct adapters than that are in flight)
      -> compute slots: copied into the stacked weights of the serving layers, at most `max_loras`; a slot
         is reused (least recently used first) only when no running sequence uses its adapter

A request takes a *lease* on its adapter (`begin_request`) before it is queued and the engine returns it
when the request ends (`end_request`); `ensure_host` brings the adapter into host memory off the engine
thread, so the engine never reads files. Unloading an adapter stops new leases at once and waits for the
existing ones to end (or gives up after a timeout, saying how many requests still use it).

Thread safety: one lock guards the bookkeeping. Slot writes happen on the engine thread only
(`acquire_slot`), between forward passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from lorakit.serve.adapter_weights import AdapterLoadError, ModelLayers, ServingAdapter, load_serving_adapter
from lorakit.serve.metrics import Metrics

log = logging.getLogger("lorakit.serve")


class AdapterNotFound(LookupError):
    """No adapter of that name (or it is being unloaded)."""


class AdapterInUse(RuntimeError):
    """An unload gave up waiting for the requests that use the adapter."""


@dataclass
class AdapterEntry:
    name: str
    path: str
    host: ServingAdapter | None = None
    slot: int | None = None
    users: int = 0  # leases: requests queued or running with this adapter
    running: int = 0  # sequences in the running batch (they pin the slot)
    draining: bool = False
    loading: Future | None = field(default=None, repr=False)


class AdapterCache:
    def __init__(self, layers: ModelLayers, max_loras: int, max_cpu_loras: int, metrics: Metrics) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras}): adapters in compute "
                             "slots keep their host copy")
        self.layers = layers
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.metrics = metrics
        self._entries: dict[str, AdapterEntry] = {}
        self._host_lru: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._slot_owner: list[str | None] = [None] * (max_loras + 1)  # slot 0 is the base
        self._slot_used: list[int] = [0] * (max_loras + 1)
        self._tick = 0
        self._lock = threading.Condition()
        self.slot_writer: Callable[[int, ServingAdapter], None] | None = None  # set by the engine

    @property
    def num_slots(self) -> int:
        """Slots in the serving layers' stacks, the base slot included."""
        return self.max_loras + 1

    # ---- registry -------------------------------------------------------------------------------------------
    def register(self, name: str, path: str) -> None:
        with self._lock:
            if name in self._entries:
                raise ValueError(f"an adapter named {name!r} is already loaded ({self._entries[name].path})")
            self._entries[name] = AdapterEntry(name, path)

    def names(self) -> list[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if not e.draining]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and not entry.draining

    def load_now(self, name: str, path: str) -> ServingAdapter:
        """Register and read an adapter at run time (POST /v1/load_lora_adapter): a bad adapter fails here,
        before it is registered."""
        with self._lock:
            if name in self._entries:
                raise ValueError(f"an adapter named {name!r} is already loaded ({self._entries[name].path}); "
                                 "unload it first")
        adapter = self._read(name, path)
        with self._lock:
            if name in self._entries:
                raise ValueError(f"an adapter named {name!r} was loaded meanwhile")
            self._entries[name] = AdapterEntry(name, path, host=adapter)
            self._touch_host(name)
        return adapter

    def unload(self, name: str, timeout: float) -> None:
        """Stop new requests for `name`, wait until the requests using it end, then forget it."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.draining:
                raise AdapterNotFound(f"no adapter named {name!r} is loaded")
            entry.draining = True
            if not self._lock.wait_for(lambda: entry.users == 0, timeout):
                entry.draining = False
                raise AdapterInUse(f"adapter {name!r} is still used by {entry.users} request(s) after {timeout:g} s; "
                                   "try again when they have finished")
            if entry.slot is not None:
                self._slot_owner[entry.slot] = None
            self._host_lru.pop(name, None)
            del self._entries[name]

    # ---- leases (HTTP handlers) ---------------------------------------------------------------------------------
    def begin_request(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.draining:
                raise AdapterNotFound(f"the model {name!r} does not exist")
            entry.users += 1

    def end_request(self, name: str) -> None:
        with self._lock:
            self._entries[name].users -= 1
            self._evict_host()
            self._lock.notify_all()

    def ensure_host(self, name: str) -> None:
        """Bring a leased adapter into host memory (reads its files unless already there); concurrent callers
        share one read. Raises AdapterLoadError when the files cannot be served."""
        with self._lock:
            entry = self._entries[name]
            if entry.host is not None:
                self.metrics.adapter_hits.inc(tier="host")
                self._touch_host(name)
                return
            future, owner = entry.loading, entry.loading is None
            if owner:
                future = entry.loading = Future()
        if owner:
            try:
                adapter = self._read(name, entry.path)
            except BaseException as err:
                with self._lock:
                    entry.loading = None
                future.set_exception(err)
                raise
            with self._lock:
                entry.host, entry.loading = adapter, None
                self._touch_host(name)
            future.set_result(None)
        else:
            future.result()

    def _read(self, name: str, path: str) -> ServingAdapter:
        start = time.perf_counter()
        try:
            adapter = load_serving_adapter(name, path, self.layers)
        except AdapterLoadError:
            self.metrics.adapter_load_failures.inc()
            raise
        self.metrics.adapter_loads.inc(source="disk")
        log.info("adapter %s read from %s in %.3f s (%d modules, %.1f MB)", name, path,
                 time.perf_counter() - start, len(adapter.modules), adapter.nbytes / 1e6)
        return adapter

    def _touch_host(self, name: str) -> None:
        self._host_lru[name] = None
        self._host_lru.move_to_end(name)
        self._evict_host()

    def _evict_host(self) -> None:
        """Drop the least recently used host copies beyond the budget, never one that a request still needs."""
        excess = len(self._host_lru) - self.max_cpu_loras
        for name in list(self._host_lru):
            if excess <= 0:
                break
            entry = self._entries[name]
            if entry.users == 0 and entry.slot is None and entry.loading is None:
                entry.host = None
                del self._host_lru[name]
                self.metrics.adapter_evictions.inc(tier="host")
                excess -= 1

    # ---- compute slots (engine thread) ------------------------------------------------------------------------
    def acquire_slot(self, name: str, may_load: bool = True) -> int | None:
        """The slot holding `name` for one more running sequence; copies it in (evicting the least recently used
        idle adapter) when needed and `may_load`. None when every slot is busy (the request waits)."""
        with self._lock:
            entry = self._entries[name]
            self._tick += 1
            if entry.slot is not None:
                self.metrics.adapter_hits.inc(tier="compute")
            else:
                if not may_load:
                    return None
                slot = self._free_slot()
                if slot is None:
                    return None
                old = self._slot_owner[slot]
                if old is not None:
                    self._entries[old].slot = None
                    self.metrics.adapter_evictions.inc(tier="compute")
                self.slot_writer(slot, entry.host)
                self._slot_owner[slot], entry.slot = name, slot
                self.metrics.adapter_loads.inc(source="host")
            entry.running += 1
            self._slot_used[entry.slot] = self._tick
            return entry.slot

    def release_slot(self, name: str) -> None:
        with self._lock:
            self._entries[name].running -= 1

    def _free_slot(self) -> int | None:
        idle = [s for s in range(1, self.num_slots)
                if self._slot_owner[s] is None or self._entries[self._slot_owner[s]].running == 0]
        if not idle:
            return None
        empty = [s for s in idle if self._slot_owner[s] is None]
        return empty[0] if empty else min(idle, key=lambda s: self._slot_used[s])

    # ---- information ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            return {
                "registered": sum(not e.draining for e in self._entries.values()),
                "host": len(self._host_lru),
                "compute": sum(owner is not None for owner in self._slot_owner[1:]),
                "max_loras": self.max_loras,
                "max_cpu_loras": self.max_cpu_loras,
            }

    def resident(self) -> dict[str, str]:
        """name -> "compute" | "host" | "disk", for /health."""
        with self._lock:
            return {n: "compute" if e.slot is not None else "host" if e.host is not None else "disk"
                    for n, e in self._entries.items() if not e.draining}

