"""How the benchmarks measure: every measurement in a fresh process, the compared ways interleaved, medians.

On a machine shared with other work, one slow minute would hit whatever runs during it. So each measurement
(one library, one setting, a few timed steps) runs in its own subprocess (`python -m lorakit.bench.worker`):
nothing is shared between them (allocator state, oneDNN caches, threads), peak RSS is the process's own, and
the ways being compared take turns, repetition after repetition, so that load changes hit them alike. The
reported figure is the median over the repetitions; each measurement records the 1-minute load average
before and after it.

lorakit's training runs get the malloc `lorakit train` gets (tcmalloc when installed:
lorakit/train/runtime.py); everything else runs on the C library's malloc, as a user's own program does, unless
its spec says `"malloc": "preferred"` (`bench train --same-malloc`). Each result names the malloc it ran on.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Iterable

RESULT_PREFIX = "LORAKIT-BENCH-RESULT "


class WorkerError(RuntimeError):
    """A measurement subprocess failed (its stderr tail is in the message)."""


def run_worker(spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh Python process and return its result dict."""
    command = [sys.executable, "-m", "lorakit.bench.worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_worker_env(spec))
    except subprocess.TimeoutExpired as err:
        raise WorkerError(f"the {spec.get('kind')} measurement {_label(spec)} took over {timeout:.0f} s") from err
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join(done.stderr.strip().splitlines()[-12:])
    raise WorkerError(f"the {spec.get('kind')} measurement {_label(spec)} failed (exit code {done.returncode}):\n{tail}")


def _worker_env(spec: dict) -> dict:
    """The parent's environment, with this lorakit first on the path (also when run from a source tree) and,
    for the runs that train as `lorakit train` does, its malloc."""
    from lorakit.train.runtime import allocator_environment

    env = dict(os.environ)
    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.get("malloc", "preferred" if trains_as_lorakit(spec) else "system") == "preferred":
        env = allocator_environment(env) or env
    return env


def trains_as_lorakit(spec: dict) -> bool:
    """A run that trains the way `lorakit train` does (its process settings: lorakit/train/runtime.py)."""
    return spec["kind"] == "trainer" or (spec["kind"] == "train" and spec.get("library") == "lorakit")


def _label(spec: dict) -> str:
    keys = ("library", "setting", "mode", "batch", "seq")
    return "(" + ", ".join(f"{k}={spec[k]}" for k in keys if k in spec) + ")"


def emit(result: dict) -> None:
    """What a worker prints as its last line."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def machine(probes: Iterable[dict | None] = ()) -> dict:
    """What the numbers were measured on; probes: the workers' machine probes (probe_machine), summarised."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "probe": probe_summary(probes)}


# the probe's matmul, (rows, d_in, d_out): SmolLM2's MLP up-projection in a 4 x 256 training step; its copy: 64 MB,
# twice the EPYC's L3 cache, so that it measures memory
PROBE_MATMUL_SHAPE = (1024, 576, 1536)
PROBE_COPY_FLOATS = 16 * 1024 * 1024


def probe_machine(repeats: int = 5) -> dict:
    """What one thread of the machine could do when a measurement ran (best of `repeats`, after untimed calls):
    GFLOP/s of one dense CPU product of PROBE_MATMUL_SHAPE per kernel ("bf16_gflops" on oneDNN, "fp32_onednn_gflops",
    "fp32_aten_gflops" on MKL) and the memory bandwidth of a 64 MB copy ("copy_gb_s", bytes read + written).
    A VM's CPU may change speed from one run to the next (docs/performance.md, "Method": the EPYC's two states,
    AVX-512 at full or half rate, which doubles or halves oneDNN's rates while MKL's AVX2 path on AMD stays put;
    neighbours' memory traffic, which the copy shows). Each worker runs it after its measurement and its peak
    RSS (result "machine_probe"); the reports give the range over their runs. ~0.5 s."""
    import torch

    from lorakit.ops.matmul import kernels

    rows, d_in, d_out = PROBE_MATMUL_SHAPE
    found = kernels()
    matmuls = [("fp32_aten_gflops", found["aten"], torch.float32)]
    if "onednn" in found:
        matmuls += [("fp32_onednn_gflops", found["onednn"], torch.float32),
                    ("bf16_gflops", found["onednn"], torch.bfloat16)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    probe = {}
    try:
        generator = torch.Generator().manual_seed(0)
        x32, w32 = (torch.randn(shape, generator=generator) for shape in ((rows, d_in), (d_out, d_in)))
        for name, kernel, dtype in matmuls:
            x, w = x32.to(dtype), w32.to(dtype)
            probe[name] = round(2 * rows * d_in * d_out / _best_time(lambda: kernel(x, w), repeats) / 1e9, 1)
        source, target = torch.ones(PROBE_COPY_FLOATS), torch.empty(PROBE_COPY_FLOATS)
        probe["copy_gb_s"] = round(2 * source.nbytes / _best_time(lambda: target.copy_(source), repeats) / 1e9, 1)
    finally:
        torch.set_num_threads(threads)
    return probe


def _best_time(call, repeats: int) -> float:
    """The shortest of `repeats` timed calls after two untimed ones (set-up, caches): a neighbour's burst or a page
    fault slows one call, never speeds it up."""
    times = []
    for i in range(repeats + 2):
        started = time.perf_counter()
        call()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return min(times)


def probe_label(probe: dict | None) -> str:
    """A worker's probe for its progress line: "matmul bf16 205, fp32 105 (oneDNN), fp32 90 (aten) GFLOP/s, copy 12.5
    GB/s a thread"."""
    if not probe:
        return ""
    matmuls = [f"bf16 {probe['bf16_gflops']:.0f}" if "bf16_gflops" in probe else None,
               f"fp32 {probe['fp32_onednn_gflops']:.0f} (oneDNN)" if "fp32_onednn_gflops" in probe else None,
               f"fp32 {probe['fp32_aten_gflops']:.0f} (aten)" if "fp32_aten_gflops" in probe else None]
    copy = f", copy {probe['copy_gb_s']:.1f} GB/s" if "copy_gb_s" in probe else ""
    return "matmul " + ", ".join(m for m in matmuls if m) + " GFLOP/s" + copy + " a thread"


def probe_summary(probes: Iterable[dict | None]) -> dict:
    """figure -> min / median / max of the workers' probes over a run: a wide range means the machine changed state
    during the run (then compare ratios within one repetition)."""
    probes = [p for p in probes if p]
    return {name: {"min": min(p[name] for p in probes if name in p),
                   "median": round(median(p[name] for p in probes if name in p), 1),
                   "max": max(p[name] for p in probes if name in p)}
            for name in dict.fromkeys(k for p in probes for k in p)}


def probe_report_line(summary: dict) -> str:
    """The report's line on the machine's state over the run."""
    if not summary:
        return "machine probe: not measured"
    return ("machine probe over the runs, one thread (min / median / max; docs/performance.md \"Method\"): " +
            "; ".join(f"{name} {v['min']:g} / {v['median']:g} / {v['max']:g}" for name, v in summary.items()))


def table(header: list[str], rows: list[list]) -> str:
    """A plain aligned text table."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str | None, report: dict) -> None:
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {path}")
