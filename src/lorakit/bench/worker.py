"""One measurement, in its own process: `python -m lorakit.bench.worker '<json spec>'` (harness.py runs it).

The spec's "kind" names the measurement (train, infer, trainer); the result is printed as one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

from lorakit.bench.harness import emit, load_average, probe_machine, trains_as_lorakit
from lorakit.train.run_log import peak_rss_mb
from lorakit.train.runtime import allocator_name, tune_process


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    load_before = load_average()
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    if trains_as_lorakit(spec):
        tune_process()  # as `lorakit train` does (lorakit/train/runtime.py; its malloc comes from harness.py)
    started = time.perf_counter()
    if spec["kind"] == "train":
        from lorakit.bench.train import measure
    elif spec["kind"] == "infer":
        from lorakit.bench.infer import measure
    elif spec["kind"] == "trainer":
        from lorakit.bench.trainer import measure
    else:
        raise ValueError(f"unknown measurement kind {spec['kind']!r}")
    result = measure(spec)
    result.update(load_before=load_before, load_after=load_average(),
                  peak_rss_mb=round(peak_rss_mb(), 1),
                  process_seconds=round(time.perf_counter() - started, 1), malloc=allocator_name())
    result["machine_probe"] = probe_machine()  # after the measurement and its peak RSS: the machine's state
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
