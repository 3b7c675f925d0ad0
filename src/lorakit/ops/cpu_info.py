"""What this CPU is, read once from /proc/cpuinfo: the kernel choices that depend on it (ops/matmul.py,
ops/attention.py) ask here.

    cpu_vendor()    "GenuineIntel", "AuthenticAMD", ... ("" where there is no /proc/cpuinfo)
    cpu_has_amx()   AMX bf16 tiles (Intel Xeon from Sapphire Rapids): oneDNN's bf16 matmuls and PyTorch's flash
                    attention run on them
"""

from __future__ import annotations

import functools


def first_cpu_fields(lines) -> dict[str, str]:
    """The `key: value` fields of the first processor in /proc/cpuinfo's lines."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


@functools.cache
def _first_cpu() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return first_cpu_fields(info)
    except OSError:
        return {}


def cpu_vendor() -> str:
    return _first_cpu().get("vendor_id", "")


def cpu_has_amx() -> bool:
    return "amx_bf16" in _first_cpu().get("flags", "").split()
