"""The benchmarks' probe of the machine's state (lorakit.bench.harness.matmul_rates) and its summaries."""

from __future__ import annotations

import torch

from lorakit.bench import harness
from lorakit.ops.matmul import kernels


def test_each_kernel_computes_x_times_w_transposed():
    x, w = torch.randn(5, 7, dtype=torch.float64).float(), torch.randn(3, 7)
    for name, kernel in kernels().items():
        torch.testing.assert_close(kernel(x, w), x @ w.T, msg=name)


def test_matmul_rates_times_every_kernel_on_one_thread_and_restores_the_thread_count():
    threads = torch.get_num_threads()
    rates = harness.matmul_rates(repeats=1)
    assert torch.get_num_threads() == threads
    expected = {"fp32_aten"} | ({"fp32_onednn", "bf16"} if "onednn" in kernels() else set())
    assert set(rates) == expected and all(rate > 0 for rate in rates.values())


def test_rates_summary_gives_each_kernels_range_and_skips_runs_without_a_probe():
    runs = [{"bf16": 200.0, "fp32_aten": 90.0}, None, {"bf16": 410.0, "fp32_aten": 95.0}, {"bf16": 205.0}]
    summary = harness.rates_summary(runs)
    assert summary == {"bf16": {"min": 200.0, "median": 205.0, "max": 410.0},
                       "fp32_aten": {"min": 90.0, "median": 92.5, "max": 95.0}}
    line = harness.rates_report_line(summary)
    assert "bf16 200 / 205 / 410" in line and "fp32_aten 90 / 92 / 95" in line
    assert harness.rates_report_line({}) == "matmul rates: not measured"
    assert harness.rates_label({"bf16": 205.4, "fp32_onednn": 104.6, "fp32_aten": 90.0}) == (
        "matmul bf16 205, fp32 105 (oneDNN), fp32 90 (aten) GFLOP/s a thread")
    assert harness.rates_label(None) == ""
