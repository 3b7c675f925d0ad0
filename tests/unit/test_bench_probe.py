"""The benchmarks' probe of the machine's state (lorakit.bench.harness.probe_machine) and its summaries."""

from __future__ import annotations

import torch

from lorakit.bench import harness
from lorakit.ops.matmul import kernels


def test_each_kernel_computes_x_times_w_transposed():
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    for name, kernel in kernels().items():
        torch.testing.assert_close(kernel(x, w), x @ w.T, msg=name)


def test_probe_times_every_kernel_and_a_copy_on_one_thread_and_restores_the_thread_count():
    threads = torch.get_num_threads()
    probe = harness.probe_machine(repeats=1)
    assert torch.get_num_threads() == threads
    expected = {"fp32_aten_gflops", "copy_gb_s"}
    if "onednn" in kernels():
        expected |= {"fp32_onednn_gflops", "bf16_gflops"}
    assert set(probe) == expected and all(value > 0 for value in probe.values())


def test_probe_summary_gives_each_figures_range_and_skips_runs_without_a_probe():
    runs = [{"bf16_gflops": 200.0, "copy_gb_s": 9.5}, None, {"bf16_gflops": 410.0, "copy_gb_s": 12.0},
            {"bf16_gflops": 205.0}]
    summary = harness.probe_summary(runs)
    assert summary == {"bf16_gflops": {"min": 200.0, "median": 205.0, "max": 410.0},
                       "copy_gb_s": {"min": 9.5, "median": 10.8, "max": 12.0}}  # the median of two rounds
    line = harness.probe_report_line(summary)
    assert "bf16_gflops 200 / 205 / 410" in line and "copy_gb_s 9.5 / 10.8 / 12" in line
    assert harness.probe_report_line({}) == "machine probe: not measured"
    assert harness.probe_label({"bf16_gflops": 205.4, "fp32_onednn_gflops": 104.6, "fp32_aten_gflops": 90.0,
                                "copy_gb_s": 12.46}) == (
        "matmul bf16 205, fp32 105 (oneDNN), fp32 90 (aten) GFLOP/s, copy 12.5 GB/s a thread")
    assert harness.probe_label(None) == ""
