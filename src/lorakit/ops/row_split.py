"""Row-split tuning of oneDNN's bf16 matmuls: some shapes run much faster as two or four calls on parts of their rows.

oneDNN chooses its blocking and its split of the work between threads from the shape alone, and some choices are
slow. On an Intel Xeon with AMX (2 threads), `x @ w.T` with 576 output columns (SmolLM2's hidden size: the
attention's q and o, the MLP's down projection, every input gradient but the down projection's) runs at ~1.4
TFLOP/s for 640-1,280 rows and at 2.3-3.2 TFLOP/s on either side; the 1,024 rows of a 4 x 256 step done as two
calls of 512 take 0.78 instead of 1.27 ms (docs/performance.md, optimisation 45). Which shapes suffer depends on
the CPU, the thread count and oneDNN's version, so it is measured here, not listed:

- each product shape (rows, inner and output sizes, the operands' strides, dtype, threads) gets a Plan;
- its first TUNE_AFTER_CALLS calls run whole (a shape that does not recur is never tuned); the next also runs
  every split in CANDIDATE_PARTS and keeps only those whose result equals the whole's bit for bit;
- the next calls take turns between the whole and the kept splits, timed, ROUNDS each; then the fastest stays for
  the shape's later calls, a split only when it is at least MIN_GAIN faster than the whole.

oneDNN's order of summation depends on the shape, and at fewer rows some shapes sum in another order; the
equality test leaves those whole. So the choice never changes a result: a run is as deterministic, and a resumed
run as exact, as without the tuning, whichever way the timings fall. The 30 layers of a model share their shapes,
so a fixed-shape run (packed data, the benchmarks) tunes in its second or third step, at one extra call per split
per shape.

Only bf16 products without bias on CPUs where aten's bf16 matmul is oneDNN's (the parts write into one output
through torch.mm(out=), which must be the same kernel as lorakit.ops.matmul's whole call: the equality test checks
that too), with at least MIN_ROWS rows and MIN_MACS multiply-accumulates, and outputs of at most MAX_OUTPUT_BYTES
(the equality test is made part by part in one part-sized buffer: a second whole output of an LM head's logits
chunk would raise the step's peak memory by its 48 MB).
"""

from __future__ import annotations

import statistics
import time

import torch

ENABLED = True
CANDIDATE_PARTS = (2, 4)
MIN_ROWS = 256  # the parts keep at least 128 rows
MIN_PART_ROWS = 128
MIN_MACS = 1 << 24  # smaller products (LoRA's rank-r ones) cost ~10-50 us, where the call's own cost weighs
ROUNDS = 3
MIN_GAIN = 0.05
# larger outputs are not split: the tuning's equality test holds one part's output beside the whole's, and such
# products (an LM head's logits, 48 MB a chunk for SmolLM2) run at the step's peak memory
MAX_OUTPUT_BYTES = 16 * 2 ** 20
# whole calls of a shape before it is tuned: more than one step's worth for a model of ~30 layers (each shape is
# called once or twice a layer), so that a shape seen in one step only, as the lengths of unpacked real data come
# and go, does not pay the tuning (extra calls; oneDNN kernels for the parts, which stay in its cache: on 60 steps
# of 40 distinct lengths, tuning every shape from its second call cost 4.8% of the time and 141 MB of peak RSS)
TUNE_AFTER_CALLS = 64
# distinct shapes given a plan; later ones run whole. A fixed-shape run has ~16 (8 products, forward and backward);
# a run whose shapes keep changing (unpacked data: a new length every few steps) stops tuning here, which bounds
# what the parts' oneDNN kernels hold (on 60 steps of 40 lengths: peak RSS +80 MB with 4,096 plans, +0 with 64)
MAX_PLANS = 64


class Plan:
    """One product shape's tuning: the parts it runs in once decided (`parts`), else the timings so far."""

    __slots__ = ("calls", "parts", "candidates", "times")

    def __init__(self) -> None:
        self.calls = 0
        self.parts: int | None = None
        self.candidates: tuple[int, ...] = ()
        self.times: dict[int, list[float]] = {}

    def next_to_time(self) -> int:
        return self.candidates[(self.calls - TUNE_AFTER_CALLS - 2) % len(self.candidates)]

    def record(self, parts: int, seconds: float) -> None:
        self.times[parts].append(seconds)
        if all(len(t) >= ROUNDS for t in self.times.values()):
            medians = {p: statistics.median(t) for p, t in self.times.items()}
            best = min(medians, key=medians.get)
            self.parts = best if medians[best] < (1.0 - MIN_GAIN) * medians[1] else 1
            self.times = {}


_PLANS: dict[tuple, Plan] = {}


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `x @ weight.T` is a product this tuning may split (the caller has chosen oneDNN for it)."""
    if not ENABLED or bias is not None or x.dtype != torch.bfloat16 or not x.is_contiguous() \
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):  # torch.mm(out=): no autograd
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return rows >= MIN_ROWS and rows * x.shape[-1] * weight.shape[0] >= MIN_MACS \
        and rows * weight.shape[0] * x.element_size() <= MAX_OUTPUT_BYTES


def linear(x: torch.Tensor, weight: torch.Tensor, whole) -> torch.Tensor:
    """x @ weight.T as `whole(x, weight)` computes it, possibly in parts of x's rows (same bits)."""
    key = (x.shape, weight.shape, weight.stride(), x.dtype, torch.get_num_threads())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            return whole(x, weight)
        plan = _PLANS[key] = Plan()
    if plan.parts is not None:
        return whole(x, weight) if plan.parts == 1 else _in_parts(x, weight, plan.parts)
    plan.calls += 1
    if plan.calls <= TUNE_AFTER_CALLS:  # a shape that recurs is worth tuning; one seen in a single step is not
        return whole(x, weight)
    if plan.calls == TUNE_AFTER_CALLS + 1:
        out = whole(x, weight)
        rows = out.numel() // out.shape[-1]
        plan.candidates = (1,) + tuple(p for p in CANDIDATE_PARTS if rows // p >= MIN_PART_ROWS
                                       and _parts_equal(x, weight, p, out))
        if len(plan.candidates) == 1:
            plan.parts = 1
        else:
            plan.times = {p: [] for p in plan.candidates}
        return out
    parts = plan.next_to_time()
    start = time.perf_counter()
    out = whole(x, weight) if parts == 1 else _in_parts(x, weight, parts)
    plan.record(parts, time.perf_counter() - start)
    return out


def _in_parts(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    x2 = x.view(-1, x.shape[-1])
    out = x.new_empty(x.shape[:-1] + (weight.shape[0],))
    out2 = out.view(-1, weight.shape[0])
    for x_part, out_part in zip(x2.chunk(parts), out2.chunk(parts)):
        torch.mm(x_part, weight.t(), out=out_part)
    return out


def _parts_equal(x: torch.Tensor, weight: torch.Tensor, parts: int, out: torch.Tensor) -> bool:
    """Whether _in_parts(x, weight, parts) would equal `out` bit for bit, checked part by part in one part-sized
    buffer (a whole second output, at the step's peak, would raise it)."""
    x_parts, out_parts = x.view(-1, x.shape[-1]).chunk(parts), out.view(-1, out.shape[-1]).chunk(parts)
    buffer = torch.empty_like(out_parts[0])  # the first part is the largest
    for x_part, out_part in zip(x_parts, out_parts):
        result = buffer[:x_part.shape[0]]
        torch.mm(x_part, weight.t(), out=result)
        if not torch.equal(result, out_part):
            return False
    return True


def plans() -> dict[tuple, int | None]:
    """shape key -> parts chosen (None while tuning): for tests and benchmarks."""
    return {key: plan.parts for key, plan in _PLANS.items()}


def reset() -> None:
    """Forget every shape's plan (the next calls tune again)."""
    _PLANS.clear()
