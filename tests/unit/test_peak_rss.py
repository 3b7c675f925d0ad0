"""peak_rss_mb (train/run_log.py, and every benchmark worker's memory figure) is the process's own peak."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorakit.train.run_log import peak_rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent's peak leaks into ru_maxrss on Linux")
def test_a_child_started_by_a_big_parent_reports_its_own_peak():
    """Python's subprocess starts a child with vfork, and Linux keeps the parent's peak in the child's ru_maxrss:
    a benchmark worker started after the parent held 2 GB reported 2 GB (run on a bf16 checkpoint, whose
    initial adapter the parent built from an fp32 copy)."""
    held = torch.ones(2 ** 29)  # 2 GiB, touched
    assert peak_rss_mb() > 2048
    code = "from lorakit.train.run_log import peak_rss_mb; print(peak_rss_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del held
    assert 0 < float(done.stdout) < 1024  # the child's own: the interpreter and its imports (ru_maxrss: > 2 GB)
