"""lorakit.file_pages: the pages of converted weights read from a mapped checkpoint go back to the system, and no
value ever changes."""

from __future__ import annotations

import mmap
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit import file_pages
from lorakit.file_pages import FileMappings, release_file_pages
from lorakit.train.precision import store_frozen_weights_in_bf16
from tests.tiny import tiny_llama

MAPS = """\
7f0000000000-7f0000004000 r--p 00000000 08:01 1234 /models/a/model.safetensors
7f0000004000-7f0000010000 r--p 00004000 08:01 1234 /models/a/model.safetensors
7f0000020000-7f0000030000 rw-s 00000000 00:05 99 /dev/shm/torch_123
7f0000040000-7f0000050000 rw-p 00000000 00:00 0 [heap]
7f0000060000-7f0000070000 rw-p 00000000 00:00 0
7f0000080000-7f0000090000 rw-p 00000000 00:06 17 /dev/zero (deleted)
7f00000a0000-7f00000b0000 r--p 00000000 08:01 555 /usr/lib/libc.so.6
"""


def test_the_private_mappings_of_regular_files_are_read_and_their_parts_joined(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    mappings = FileMappings.read(str(maps))
    assert mappings.starts == [0x7F0000000000, 0x7F00000A0000]  # shared memory, anonymous, /dev: left out
    assert mappings.ends == [0x7F0000010000, 0x7F00000B0000]
    assert mappings.covers(0x7F0000001000, 0x7F0000008000)  # across the two listed parts of one file
    assert not mappings.covers(0x7F000000F000, 0x7F0000011000)
    assert not mappings.covers(0x7F0000040000, 0x7F0000041000)
    assert FileMappings.read(str(tmp_path / "missing")).starts == []


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def _mapped_floats(path, count: int):
    path.write_bytes(torch.arange(count, dtype=torch.float32).numpy().tobytes())
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mapping, torch.frombuffer(mapping, dtype=torch.float32)


def _pageout_works(tmp_path) -> bool:
    mapping, weights = _mapped_floats(tmp_path / "probe.bin", 1 << 16)
    weights.sum()
    works = release_file_pages(weights, FileMappings.read()) > 0
    del weights
    mapping.close()
    return works


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_released_pages_leave_resident_memory_and_every_value_stays(tmp_path):
    count = 8 << 20  # 32 MB
    mapping, weights = _mapped_floats(tmp_path / "weights.bin", count)
    weights[5] = -1.0  # a page the process wrote: kept as written
    expected = torch.arange(count, dtype=torch.float32)
    expected[5] = -1.0
    assert torch.equal(weights, expected)  # every page read: resident
    before = _resident_bytes()
    released = release_file_pages(weights, FileMappings.read())
    if released == 0:
        pytest.skip("this kernel does not reclaim pages on request (MADV_PAGEOUT: Linux >= 5.4)")
    assert released >= count * 4 - 2 * mmap.PAGESIZE
    assert before - _resident_bytes() >= released // 2
    assert torch.equal(weights, expected)  # read back from the file, the written page as written
    del weights
    mapping.close()


def test_tensors_in_ordinary_memory_are_left_alone():
    tensor = torch.randn(1 << 20)
    copy = tensor.clone()
    assert release_file_pages(tensor, FileMappings.read()) == 0
    assert release_file_pages(tensor[::2], FileMappings.read()) == 0  # not contiguous
    assert torch.equal(tensor, copy)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_bf16_storage_of_a_loaded_checkpoint_releases_its_pages_and_keeps_the_cast_values(tmp_path, monkeypatch):
    tiny_llama(hidden_size=256, intermediate_size=1024).save_pretrained(tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "model"),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    released = []
    monkeypatch.setattr(file_pages, "release_file_pages",  # what precision's cast_in_place calls
                        lambda tensor, mappings: released.append(release_file_pages(tensor, mappings)))
    stored = store_frozen_weights_in_bf16(model)
    assert len(released) == len(stored) > 0
    if not _pageout_works(tmp_path):
        pytest.skip("this kernel does not reclaim pages on request (MADV_PAGEOUT: Linux >= 5.4)")
    # transformers maps the checkpoint: the weights' pages (each at least 256 KB here) are given back
    assert sum(released) >= 0.9 * sum(p.numel() * 4 for p in reference.parameters() if p.numel() >= 1 << 16)
    weights = dict(model.get_base_model().named_parameters())
    for name, param in reference.named_parameters():
        name = name.replace("_proj.weight", "_proj.base_layer.weight")
        assert weights[name].dtype == torch.bfloat16, name
        assert torch.equal(weights[name], param.detach().to(torch.bfloat16)), name


def test_a_safetensors_file_is_released_through_its_mapping(tmp_path):
    from safetensors import safe_open

    count = 4 << 20
    save_file({"w": torch.arange(count, dtype=torch.float32)}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as file:
        weight = file.get_tensor("w")
    converted = weight.to(torch.bfloat16)
    release_file_pages(weight, FileMappings.read())  # whether the file was mapped or read: values stay
    assert torch.equal(weight, torch.arange(count, dtype=torch.float32))
    assert torch.equal(converted, torch.arange(count, dtype=torch.float32).to(torch.bfloat16))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_quantizing_a_loaded_checkpoint_releases_the_dense_weights_pages(tmp_path, monkeypatch):
    from lorakit.methods.quant import convert

    tiny_llama(hidden_size=256, intermediate_size=1024).save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    released = []
    monkeypatch.setattr(convert, "release_file_pages",
                        lambda tensor, mappings: released.append(release_file_pages(tensor, mappings)))
    convert.quantize_model(model, "nf4")
    layers = convert.quantized_layers(model)
    assert len(released) == len(layers) > 0
    if not _pageout_works(tmp_path):
        pytest.skip("this kernel does not reclaim pages on request (MADV_PAGEOUT: Linux >= 5.4)")
    assert sum(released) >= 0.9 * sum(dense[n].numel() * 4 for n, _ in layers)
    for name, layer in layers:  # quantized from the weights as loaded
        error = (layer.dequantized_weight().float() - dense[name]).abs().max()
        assert error <= 0.2 * dense[name].abs().max(), name
