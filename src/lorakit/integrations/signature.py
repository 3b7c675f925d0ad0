"""What `inspect.signature` shows for `PeftModel.forward`, so that trainers find the inputs and labels.

Trainers read the forward signature of the model they train. transformers' Trainer keeps only the dataset columns
that `model.forward` names (`remove_unused_columns`, on by default), and finds the label columns in the forward of
the model's *class* (`label_names`: without them evaluation computes no `eval_loss`). A wrapper written as
`forward(*args, **kwargs)` names nothing, so every column was dropped. HuggingFace PEFT's wrappers are special-cased
by these trainers (they look through them to the wrapped model); lorakit's are not, so the wrapper itself shows:

- on a model (`inspect.signature(peft_model.forward)`): the wrapped model's own forward parameters, then the
  keyword-only `adapter_names` (mixed-adapter batches), e.g. `(input_ids=None, attention_mask=None, ...,
  labels=None, ..., *, adapter_names=None, **kwargs)` for a causal LM;
- on the class (`PeftModel.forward`, what `label_names` detection reads): `(self, *args, labels=None,
  adapter_names=None, **kwargs)`. `labels` goes to the wrapped model like any other keyword; it is named because
  every task lorakit trains (CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS) takes its targets as `labels`.

The call itself is unchanged: the function runs as written, only its advertised signature differs.
"""

from __future__ import annotations

import inspect
import types
import weakref
from inspect import Parameter
from typing import Callable

ADAPTER_NAMES = Parameter("adapter_names", Parameter.KEYWORD_ONLY, default=None)
LABELS = Parameter("labels", Parameter.KEYWORD_ONLY, default=None)


class forward_with_model_signature:  # noqa: N801 - used as a decorator, like `property`
    """Decorator for `PeftModel.forward`: an instance's bound forward advertises the wrapped model's parameters
    (`instance.get_base_model().forward`) plus `adapter_names`; the class attribute advertises `labels`.

    A non-data descriptor: assigning `model.forward = ...` on an instance (as accelerate's mixed precision does)
    still overrides it. The per-instance functions live in a weak dictionary, not on the instance, so that the
    model copies, pickles and replicates (DataParallel) like any module."""

    def __init__(self, function: Callable) -> None:
        self.function = function
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.name not in ("labels", "adapter_names")]
        function.__signature__ = signature.replace(parameters=_with_keywords(params, [LABELS, ADAPTER_NAMES]))
        self._per_instance: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.__doc__ = function.__doc__
        self.__name__ = function.__name__
        self.__qualname__ = function.__qualname__
        self.__wrapped__ = function

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.function
        function = self._per_instance.get(instance)
        if function is None:
            function = self._instance_function(instance)
            self._per_instance[instance] = function
        return types.MethodType(function, instance)

    def _instance_function(self, instance) -> Callable:
        body = self.function

        def forward(self, *args, **kwargs):
            return body(self, *args, **kwargs)

        forward.__name__, forward.__qualname__, forward.__doc__ = body.__name__, body.__qualname__, body.__doc__
        forward.__signature__ = instance_signature(instance.get_base_model().forward, body)
        return forward


def instance_signature(wrapped_forward: Callable, body: Callable) -> inspect.Signature:
    """`(self, <wrapped_forward's parameters>, *, adapter_names=None[, **kwargs])`; the class-level signature of
    `body` when the wrapped forward has none that inspect can read (a builtin, a C extension)."""
    try:
        wrapped = inspect.signature(wrapped_forward)
    except (TypeError, ValueError):
        return inspect.signature(body)
    params = [p for p in wrapped.parameters.values() if p.name != "adapter_names"]
    self_param = Parameter("self", Parameter.POSITIONAL_OR_KEYWORD)
    return wrapped.replace(parameters=[self_param, *_with_keywords(params, [ADAPTER_NAMES])],
                           return_annotation=inspect.Signature.empty)


def _with_keywords(params: list[Parameter], keywords: list[Parameter]) -> list[Parameter]:
    """`params` with the keyword-only `keywords` inserted where Python's parameter order allows: after every
    positional parameter and *args, before **kwargs."""
    var_keyword = [p for p in params if p.kind is Parameter.VAR_KEYWORD]
    others = [p for p in params if p.kind is not Parameter.VAR_KEYWORD]
    return [*others, *keywords, *var_keyword]
