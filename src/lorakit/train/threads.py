"""The CPU threads of a training process: `train.threads`.

PyTorch runs each CPU operator on a team of threads: as many as OMP_NUM_THREADS says, else one per physical core.
torchrun, when OMP_NUM_THREADS is not set, sets it to 1 for every process it starts (with a warning to tune it), so
a CPU run of N processes per node computes on N cores and leaves the others idle: on a 64-core node with 2
processes, 62 of them.

    train.threads: auto   one process, or OMP_NUM_THREADS set by you: PyTorch's own choice, unchanged;
                          under torchrun on the CPU with OMP_NUM_THREADS=1 and several processes on the node
                          (torchrun's default): the physical cores this process may run on divided among those
                          processes
    train.threads: N      N threads per process (also on GPU runs, where the CPU only feeds the device)

auto cannot tell torchrun's OMP_NUM_THREADS=1 from one you set yourself: to keep one thread per process under
torchrun, say train.threads: 1. The run prints what it chose. `run_training` gives the process its previous
thread count back when it returns, so a program that calls it is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

AUTO = "auto"


def check_threads_option(value) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.threads must be auto or a whole number of threads >= 1, got {value!r}")


def available_cores(topology: str = "/sys/devices/system/cpu") -> int:
    """The physical cores this process may run on: its affinity mask (a container's or taskset's limit included),
    with the hyperthreads of one core counted once, as PyTorch's own default counts cores (two compute threads on
    one core only compete for it). The logical CPUs where the topology cannot be read."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"{topology}/cpu{cpu}/topology/physical_package_id", encoding="ascii") as package, \
                    open(f"{topology}/cpu{cpu}/topology/core_id", encoding="ascii") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def choose_threads(setting, device: torch.device, environ: Mapping[str, str] | None = None,
                   cores: int | None = None) -> tuple[int | None, str]:
    """(threads to set, or None to leave PyTorch's choice; why, for the run's log)."""
    if setting != AUTO:
        return int(setting), "train.threads"
    environ = os.environ if environ is None else environ
    local_processes = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in environ
    if device.type != "cpu" or not launched_by_torchrun or local_processes <= 1 \
            or environ.get("OMP_NUM_THREADS") != "1":
        return None, ""
    cores = available_cores() if cores is None else cores
    threads = cores // local_processes
    if threads <= 1:  # no more cores than processes: torchrun's one thread each is the right count
        return None, ""
    return threads, (f"torchrun's OMP_NUM_THREADS=1 replaced: {cores} cores / {local_processes} processes on this "
                     f"node; train.threads: 1 keeps one")


class ThreadSetting:
    """Sets the run's thread count on entry (as choose_threads says) and gives the previous one back on exit."""

    def __init__(self, setting, device: torch.device) -> None:
        self.threads, self.reason = choose_threads(setting, device)
        self._previous: int | None = None

    def __enter__(self) -> ThreadSetting:
        if self.threads is not None:
            self._previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            torch.set_num_threads(self._previous)
