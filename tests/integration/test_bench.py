"""`lorakit bench train|infer|trainer|scale --quick`: smoke runs on a tiny model (structure of the tables and JSON only;
benchmarks are never timed tests, so no figure is asserted beyond being a positive number)."""

from __future__ import annotations

import json

import pytest

from lorakit.cli.bench import BENCHMARKS
from lorakit.train.config import TrainArgs
from tests.integration.cli_support import make_model_dir, run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("bench") / "model")


def test_bench_train_quick_compares_with_peft(model_dir, capsys, tmp_path):
    out = tmp_path / "train.json"
    code, stdout, stderr = run_cli(capsys, "bench", "train", "--quick", "--model", model_dir,
                                   "--settings", "fp32,default", "--json", out)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    rows = {(r["library"], r["setting"]): r for r in report["rows"]}
    assert set(rows) == {("lorakit", "fp32"), ("peft", "fp32"), ("lorakit", "default")}
    assert all(r["tokens_per_second"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert report["speedup_vs_peft"] > 0 and report["memory_ratio_vs_peft"] is None  # no PEFT bf16 run here
    assert report["fp32_speedup_vs_peft"] > 0
    steps = report["workload"]["warmup"] + report["workload"]["steps"]
    assert all(len(r["losses"]) == steps for r in rows.values())
    # same initial adapter, same batches, exact fp32 path: lorakit's first loss is PEFT's (up to summation order)
    assert rows["lorakit", "fp32"]["losses"][0] == pytest.approx(rows["peft", "fp32"]["losses"][0], abs=1e-4)
    assert "lorakit:default" in report["loss_agreement"]["max_abs_diff_vs_peft_fp32"]
    assert "x PEFT speed" in stdout and "lorakit default vs PEFT's fastest setting (fp32)" in stdout
    assert "Nonex" not in stdout and "peak RSS against PEFT bf16: not measured" in stdout
    assert (tmp_path / "train_loss.png").stat().st_size > 0
    # every run probes the machine after its measurement; the report gives the probes' range
    assert all(rep["machine_probe"]["fp32_aten_gflops"] > 0 for r in rows.values() for rep in r["repeats"])
    summary = report["machine"]["probe"]["copy_gb_s"]
    assert 0 < summary["min"] <= summary["median"] <= summary["max"]
    assert "machine probe over the runs" in stdout and "GB/s a thread" in stdout


def test_bench_infer_quick_reports_ratios_to_base(model_dir, capsys, tmp_path):
    out = tmp_path / "infer.json"
    code, stdout, stderr = run_cli(capsys, "bench", "infer", "--quick", "--model", model_dir, "--adapters", "3",
                                   "--modes", "base,mixed,peft-mixed", "--json", out)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["rows"]] == ["base", "mixed", "peft-mixed"]
    assert report["ratios_to_base"]["base"] == {"forward": 1.0, "decode": 1.0, "forward_cpu": 1.0, "decode_cpu": 1.0}
    assert all(r["forward_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in report["rows"])
    assert "decode ms/token" in stdout
    assert report["machine"]["probe"]["fp32_aten_gflops"]["median"] > 0


def test_bench_trainer_quick_times_lorakit_train_against_the_engine_on_the_same_batches(model_dir, capsys, tmp_path):
    out = tmp_path / "trainer.json"
    code, stdout, stderr = run_cli(capsys, "bench", "trainer", "--quick", "--model", model_dir, "--json", out)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    rows = {r["role"]: r for r in report["rows"]}
    assert set(rows) == {"trainer", "engine"}
    assert all(r["tokens_per_second"] > 0 and r["tokens_per_cpu_second"] > 0 and r["startup_seconds"] > 0
               for r in rows.values())
    assert report["trainer_vs_engine"] > 0 and len(report["trainer_vs_engine_cpu_time_per_repeat"]) == 1
    assert report["trainer_between_steps_seconds"] >= 0
    assert all(len(r["repeats"][0]["cpu_seconds"]) == report["workload"]["steps"] for r in rows.values())
    workload = report["workload"]
    assert (workload["batch"], workload["cutoff_len"], workload["data"]) == (2, 32, "source")
    assert workload["train_bf16"] == TrainArgs().bf16  # the trainer's default precision, not the bench's choice
    assert 0 < workload["timed_input_tokens"] <= workload["steps"] * 2 * 32
    # the engine built the trainer's model and trained on the trainer's batches: the trainer's logged loss (its
    # last logging window) is the engine's mean loss over the same steps
    assert report["trainer_logged_losses"] and report["loss_max_abs_diff"] < 1e-5
    assert "trainer vs engine" in stdout


def test_bench_trainer_source_dataset_is_deterministic_and_mixes_lengths(tmp_path):
    from lorakit.bench.trainer import SOURCE_RECORD_CHARS, write_source_dataset

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_source_dataset(str(first), records=30) == 30
    write_source_dataset(str(second), records=30)
    assert first.read_bytes() == second.read_bytes()
    lengths = [len(json.loads(line)["text"]) for line in first.read_text().splitlines()]
    assert all(n >= SOURCE_RECORD_CHARS[i % 3] for i, n in enumerate(lengths))
    assert min(lengths) < SOURCE_RECORD_CHARS[1] <= max(lengths)


def test_bench_scale_quick_sweeps_lengths_and_batches(model_dir, capsys, tmp_path):
    out = tmp_path / "scale.json"
    code, stdout, stderr = run_cli(capsys, "bench", "scale", "--quick", "--model", model_dir, "--lengths", "16,32",
                                   "--batches", "2", "--json", out)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert [(r["sweep"], r["batch"], r["seq"]) for r in report["rows"]] == [
        ("length", 4, 16), ("length", 2, 32), ("batch", 2, 32)]  # (2, 32) is measured once, shown in both sweeps
    assert report["rows"][1]["tokens_per_second"] == report["rows"][2]["tokens_per_second"]
    assert report["rows"][0]["relative"] == 1.0 and "slowest / fastest point" in stdout
    assert report["machine"]["probe"]["fp32_aten_gflops"]["median"] > 0


@pytest.mark.parametrize("argv, message", [
    (["train", "--quick", "--settings", "fp64"], "--settings 'fp64'"),
    (["train", "--quick", "--steps", "0"], "--steps must be >= 1"),
    (["infer", "--quick", "--modes", "merged"], "base included"),
    (["scale", "--quick", "--lengths", "48", "--tokens-per-step", "64"], "not a multiple"),
    (["trainer", "--quick", "--data", "no-such-file.jsonl"], "--data 'no-such-file.jsonl'"),
])
def test_bench_refuses_bad_options_before_measuring(capsys, argv, message):
    code, stdout, stderr = run_cli(capsys, "bench", *argv)
    assert code != 0 and message in stderr


def test_bench_lists_its_benchmarks(capsys):
    code, stdout, stderr = run_cli(capsys, "bench", "--help")
    assert code == 0 and all(name in stdout for name in BENCHMARKS)
