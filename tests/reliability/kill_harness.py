"""Kill -9 at random moments: run a lorakit command in forked children that SIGKILL themselves at the k-th
file-system write (a rename, a delete, a directory created, a file opened for writing, a safetensors file
saved), for seeded random k. Used by test_faults.py as a script:

    python kill_harness.py plan.json   ->  one JSON line on stdout: {"writes": N, "runs": [...]}

plan: {"template": DIR, "work": DIR, "argv": [... "{dir}" ...], "kills": n, "seed": s}. The command first runs
whole on a copy of `template` to count its writes N; then `kills` times on a fresh copy (work/kill-<i>) it dies
at write k, k drawn without replacement from 1..N. A write that opens or saves a file is cut half-way: the
file is created (empty or truncated) and then the process dies, as when the power goes mid-write.

The parent imports lorakit once and never runs torch code; each child forks from it (no second start-up of
torch), runs `lorakit.cli.main.main(argv)` and reports its write count through a pipe when it is not killed.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import shutil
import signal
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import safetensors.torch  # noqa: E402
import transformers.modeling_utils  # noqa: E402

import lorakit.adapter_files  # noqa: E402
import lorakit.train.checkpoint  # noqa: E402
from lorakit.cli.main import main  # noqa: E402


def install_kill_switch(kill_at: int | None, counter: list[int]) -> None:
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(function, half_write=None):
        def wrapper(*args, **kwargs):
            counter[0] += 1
            if counter[0] == kill_at:
                if half_write is not None:
                    half_write(*args, **kwargs)
                die()
            return function(*args, **kwargs)
        return wrapper

    for name in ("replace", "rename", "remove", "unlink", "rmdir", "mkdir"):
        setattr(os, name, counted(getattr(os, name)))
    shutil.rmtree = counted(shutil.rmtree)

    real_open = builtins.open

    def open_for_write(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and isinstance(file, (str, os.PathLike)):
            counter[0] += 1
            if counter[0] == kill_at:
                real_open(file, mode, *args, **kwargs).close()  # created or truncated, nothing written
                die()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_for_write

    def truncated_save(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        with real_open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)

    real_save = safetensors.torch.save_file
    saver = counted(real_save, truncated_save)
    for module in (safetensors.torch, lorakit.train.checkpoint, lorakit.adapter_files):
        module.save_file = saver
    transformers.modeling_utils.safe_save_file = saver


def run_child(argv: list[str], kill_at: int | None, log_path: str) -> dict:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the command, report the write count, never return into the parent's code
        os.close(read_end)
        try:
            import torch

            torch.set_num_threads(1)
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            counter = [0]
            install_kill_switch(kill_at, counter)
            code = main(argv)
            os.write(write_end, json.dumps({"writes": counter[0]}).encode())
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            os.write(write_end, json.dumps({"error": repr(err)}).encode())
            code = 99
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        report = json.loads(fh.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {**report, "killed": killed, "code": None if killed else os.WEXITSTATUS(status), "kill_at": kill_at}


def main_harness(plan_path: str) -> None:
    with open(plan_path, encoding="utf-8") as fh:
        plan = json.load(fh)

    def fresh_copy(name: str) -> str:
        target = os.path.join(plan["work"], name)
        shutil.copytree(plan["template"], target, symlinks=True)
        return target

    counting = fresh_copy("whole")
    whole = run_child([a.replace("{dir}", counting) for a in plan["argv"]], None, counting + ".log")
    runs = []
    if whole.get("code") == 0:
        kill_points = sorted(random.Random(plan["seed"]).sample(range(1, whole["writes"] + 1),
                                                                min(plan["kills"], whole["writes"])))
        for i, kill_at in enumerate(kill_points):
            directory = fresh_copy(f"kill-{i}")
            result = run_child([a.replace("{dir}", directory) for a in plan["argv"]], kill_at, directory + ".log")
            runs.append({**result, "dir": directory})
    print(json.dumps({"whole": whole, "writes": whole.get("writes"), "runs": runs}), flush=True)


if __name__ == "__main__":
    main_harness(sys.argv[1])
