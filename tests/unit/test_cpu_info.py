"""What lorakit reads of the CPU (ops/cpu_info.py): the first processor's fields of /proc/cpuinfo."""

from __future__ import annotations

from lorakit.ops import cpu_info

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu avx2
"""


def test_the_first_processors_fields_are_read():
    fields = cpu_info.first_cpu_fields(CPUINFO.splitlines(keepends=True))
    assert fields["vendor_id"] == "GenuineIntel"
    assert fields["model name"] == "Intel(R) Xeon(R) Processor"
    assert "amx_bf16" in fields["flags"].split() and "avx2" not in fields["flags"]


def test_vendor_and_amx_come_from_those_fields(monkeypatch):
    monkeypatch.setattr(cpu_info, "_first_cpu", lambda: cpu_info.first_cpu_fields(CPUINFO.splitlines()))
    assert cpu_info.cpu_vendor() == "GenuineIntel" and cpu_info.cpu_has_amx()
    amd = CPUINFO.split("\n\n")[1].splitlines()
    monkeypatch.setattr(cpu_info, "_first_cpu", lambda: cpu_info.first_cpu_fields(amd))
    assert cpu_info.cpu_vendor() == "AuthenticAMD" and not cpu_info.cpu_has_amx()
    monkeypatch.setattr(cpu_info, "_first_cpu", dict)  # no /proc/cpuinfo
    assert cpu_info.cpu_vendor() == "" and not cpu_info.cpu_has_amx()
    # an "amx_bf16" inside another flag's name is not AMX
    monkeypatch.setattr(cpu_info, "_first_cpu", lambda: {"flags": "fpu no_amx_bf16x"})
    assert not cpu_info.cpu_has_amx()
