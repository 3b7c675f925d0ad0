"""Training on several processes: `torchrun --nproc_per_node=2 -m lorakit train` on the CPU (gloo).

DDP with 2 processes x batch 4 must give the same adapter as 1 process x batch 8 (the same global
batch); FSDP (fully_shard, the base model sharded) must give it too, save the adapter from the shards,
and resume from its checkpoint. These equalities (1e-5) hold on the exact fp32 path, pinned in the run config:
under bf16 the halved batches' matmuls round differently (bf16 rounding, ~1e-3). The default precision (bf16
where fast) is covered by FSDP at bf16 tolerance, with a bit-exact resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train_fixtures import format_rows, save_tiny_llama, write_rows

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_llama(root / "model")
    data = write_rows(root / "train.jsonl", format_rows("alpaca", 40))
    config = {
        "model": model, "output_dir": str(root / "unused"),
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"path": data, "val_size": 8},
        # fp32: the exact path, for the 1e-5 equalities between process counts (see the module doc)
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1.0e-2, "logging_steps": 1, "seed": 3,
                  "save_steps": 3, "bf16": False},
        "eval": {"generate": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, str(path)


def run(args: list[str], processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(launcher + ["-m", "lorakit", "train", *args, "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def adapter(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "adapter", "adapter_model.safetensors"))


def losses(output_dir) -> list[float]:
    """The logged training loss of every step (logging_steps=1)."""
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r]


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def single_process(setup):
    root, config = setup
    out = root / "one"
    run([config, f"output_dir={out}", "train.batch_size=8"], processes=1)
    return adapter(out)


def test_ddp_two_processes_match_one_process(setup, single_process):
    root, config = setup
    out = root / "ddp"
    run([config, f"output_dir={out}"], processes=2)
    assert_close(adapter(out), single_process, atol=1e-5)
    trained = adapter(out)
    assert any(t.abs().max() > 0 for k, t in trained.items() if "lora_B" in k)  # B moved away from 0


def test_fsdp_two_processes_match_and_resume(setup, single_process):
    root, config = setup
    out = root / "fsdp"
    run([config, f"output_dir={out}", "train.distributed=fsdp"], processes=2)
    assert_close(adapter(out), single_process, atol=1e-5)
    # the checkpoint written from the shards holds whole tensors and resumes to the same result
    checkpoint = load_file(os.path.join(out, "checkpoint-3", "adapter_model.safetensors"))
    assert all(t.shape == single_process[k].shape for k, t in checkpoint.items())
    resumed = root / "fsdp-resumed"
    os.makedirs(resumed)
    run([config, f"output_dir={resumed}", "train.distributed=fsdp",
         f"train.resume_from_checkpoint={out}/checkpoint-3"], processes=2)
    assert_close(adapter(resumed), adapter(out), atol=1e-6)


def test_fsdp_under_the_default_precision_matches_one_process_to_bf16_rounding_and_resumes_exactly(setup):
    """The default train.bf16 (auto: bf16 here, where bf16 matmuls are fast): frozen weights stored in bf16 and
    sharded, fp32 adapters gathered for the checkpoints and the final save."""
    root, config = setup
    default = ["train.bf16=auto"]
    one, fsdp, resumed = root / "one-default", root / "fsdp-default", root / "fsdp-default-resumed"
    run([config, f"output_dir={one}", "train.batch_size=8", *default], processes=1)
    run([config, f"output_dir={fsdp}", "train.distributed=fsdp", *default], processes=2)
    trained = adapter(fsdp)
    assert all(t.dtype == torch.float32 for t in trained.values())
    # the same loss curve to bf16 rounding (Adam turns bf16 noise in near-zero gradients into lr-sized moves of
    # single entries, so the adapters are compared through what they compute); bf16 really ran: not bit-equal
    curve, curve_one = losses(fsdp), losses(one)
    assert curve == pytest.approx(curve_one, abs=2e-3) and curve != curve_one
    assert curve[-1] < curve[0] - 0.2
    os.makedirs(resumed)
    run([config, f"output_dir={resumed}", "train.distributed=fsdp", *default,
         f"train.resume_from_checkpoint={fsdp}/checkpoint-3"], processes=2)
    assert_close(adapter(resumed), trained, atol=0)
    assert losses(resumed) == curve[3:]  # a new output directory: the steps after the checkpoint
