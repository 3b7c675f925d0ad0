"""Training on several processes: `torchrun --nproc_per_node=2 -m lorakit train` on the CPU (gloo).

DDP with 2 processes x batch 4 must give the same adapter as 1 process x batch 8 (the same global
batch); FSDP (fully_shard, the base model sharded) must give it too, save the adapter from the shards,
and resume from its checkpoint.
"""

from __future__ import annotations

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
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1.0e-2, "logging_steps": 1, "seed": 3,
                  "save_steps": 3},
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
