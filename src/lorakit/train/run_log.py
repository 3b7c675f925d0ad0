"""Run records: metrics as JSON lines, a loss-curve plot, and the peak memory of the process."""

from __future__ import annotations

import json
import os
import resource
import sys

from lorakit.atomic import disk_full_says


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl. On resume, lines after the resumed step are dropped
    so the file reads as one continuous run."""

    def __init__(self, path: str, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                parsed = [(line, _parse(line)) for line in fh]
            kept = [line for line, record in parsed if record is not None and record.get("step", 0) <= resume_step]
            with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
                fh.writelines(kept)
            os.replace(f"{path}.tmp", path)

    def write(self, record: dict) -> None:
        with disk_full_says(f"a line of {os.path.basename(self.path)}", os.path.dirname(self.path) or "."):
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def _parse(line: str) -> dict | None:
    """One record, or None for a blank line or the half-written last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def plot_loss_curve(records: list[dict], path: str) -> None:
    """Training loss (and validation loss when logged) against the step, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: Linux's VmHWM (this program's own), else ru_maxrss (KiB on
    Linux, bytes on macOS). ru_maxrss is not enough on Linux: a process keeps it across exec, and one a parent
    starts with vfork (Python's subprocess) begins with the parent's peak, so a child started by a program that
    once held 3 GB would report 3 GB whatever it used."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
