"""What a model does (PEFT's task types) and what follows from it: the one home of these names."""

from __future__ import annotations

import enum


class TaskType(str, enum.Enum):
    """What the wrapped model does; decides e.g. which heads are trained in full (PEFT's names)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


TASK_TYPES = tuple(t.value for t in TaskType)
# The task types the trainer, the data pipeline and the CLI handle (the engine wraps any of TASK_TYPES).
TRAINABLE_TASK_TYPES = (TaskType.CAUSAL_LM.value, TaskType.SEQ_CLS.value)
# Attribute names of the freshly initialised classification head of transformers' *ForSequenceClassification
# models; such a head is trained in full with the adapter (as PEFT does for task_type SEQ_CLS).
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
