"""The KV cache's keyword: the forward's own signature decides; a forward naming neither gets the installed
transformers' name (`cache` from 5.24, `past_key_values` before)."""

from __future__ import annotations

import inspect

import pytest

from lorakit import cache_argument as module
from lorakit.cache_argument import cache_argument
from tests.tiny import tiny_llama


def test_a_transformers_model_gets_the_name_its_forward_takes():
    model = tiny_llama()
    name = cache_argument(model.forward)
    assert name in inspect.signature(model.forward).parameters
    assert name == cache_argument(type(model).forward)  # bound method or function: the same answer
    layer = model.model.layers[0].self_attn
    assert cache_argument(layer.forward) in inspect.signature(type(layer).forward).parameters


def test_an_explicit_parameter_wins_over_the_installed_version(monkeypatch):
    def old_style(input_ids=None, past_key_values=None, **kwargs):
        pass

    def new_style(input_ids=None, cache=None, **kwargs):
        pass

    for version in ("5.0.0", "5.24.0", "6.1.0"):
        monkeypatch.setattr(module, "TRANSFORMERS_VERSION", version)
        assert cache_argument(old_style) == "past_key_values"
        assert cache_argument(new_style) == "cache"


@pytest.mark.parametrize("version, expected", [("5.23.2", "past_key_values"), ("5.24.0", "cache"),
                                               ("5.40.0.dev0", "cache"), ("6.0.0", "cache")])
def test_a_forward_naming_neither_gets_the_installed_name(monkeypatch, version, expected):
    def wrapper(*args, **kwargs):  # a new function per case: the answer is cached per function
        pass

    monkeypatch.setattr(module, "TRANSFORMERS_VERSION", version)
    assert cache_argument(wrapper) == expected
