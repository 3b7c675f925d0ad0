"""The name under which a transformers forward takes its KV cache.

transformers 5.24 renamed the argument `past_key_values` to `cache` (the old name warns, and goes in 5.40).
A forward of an older transformers that received `cache` would take it into `**kwargs` and ignore it, decoding
from an empty cache; one of 5.40 would do the same with `past_key_values`. So lorakit never guesses:

    outputs = model(input_ids=ids, **{cache_argument(model.forward): kv_cache})

The forward's own signature decides; a forward that names neither (a wrapper taking `**kwargs`) gets the name
of the installed transformers.
"""

from __future__ import annotations

import functools
import inspect
import re

from transformers import __version__ as TRANSFORMERS_VERSION

_RENAMED_IN = (5, 24)


def cache_argument(forward) -> str:
    """"cache" or "past_key_values": the KV cache's keyword for this forward (a function or bound method)."""
    return _cache_argument(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=64)
def _cache_argument(function) -> str:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C function without a signature
        parameters = {}
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    installed = tuple(int(part) for part in re.findall(r"\d+", TRANSFORMERS_VERSION)[:2])
    return "cache" if installed >= _RENAMED_IN else "past_key_values"
