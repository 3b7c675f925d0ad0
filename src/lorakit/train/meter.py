"""What the training loop measures between log lines, saved in every checkpoint so that a resumed run logs
exactly what the uninterrupted run would have: the loss window (summed since the last log line), the last
logged loss, and the training time.

    meter = RunMeter.from_state(saved)    # or RunMeter() for a new run
    meter.add(loss, tokens, inputs)       # after each optimizer step
    if log_now: train_loss = meter.close_window()
    checkpoint_state["meter"] = meter.state()
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class RunMeter:
    window_loss: float = 0.0  # sum of (mean step loss * trained tokens) since the last log line
    window_tokens: int = 0  # trained tokens since the last log line
    window_inputs: int = 0  # input tokens since the last log line (for tokens per second)
    window_seconds: float = 0.0  # time already spent in this window before the process started (resume)
    train_loss: float | None = None  # the last logged training loss
    seconds_before: float = 0.0  # training time before this process started (resume)
    _started: float = field(default_factory=time.time, repr=False)
    _window_started: float = field(default_factory=time.time, repr=False)

    @classmethod
    def from_state(cls, state: dict | None) -> "RunMeter":
        """From a checkpoint's "meter" (None for checkpoints written before it existed: a fresh window)."""
        known = {"window_loss", "window_tokens", "window_inputs", "window_seconds", "train_loss", "seconds_before"}
        return cls(**{k: v for k, v in (state or {}).items() if k in known})

    def add(self, loss: float, tokens: int, inputs: int) -> None:
        self.window_loss += loss * tokens
        self.window_tokens += tokens
        self.window_inputs += inputs

    def speed(self) -> float:
        """Input tokens per second in the current window."""
        return self.window_inputs / max(self.window_seconds + time.time() - self._window_started, 1e-9)

    def close_window(self) -> float:
        """The window's mean loss per trained token, remembered as train_loss; a new window starts."""
        self.train_loss = self.window_loss / max(self.window_tokens, 1)
        self.window_loss, self.window_tokens, self.window_inputs, self.window_seconds = 0.0, 0, 0, 0.0
        self._window_started = time.time()
        return self.train_loss

    def train_seconds(self) -> float:
        return self.seconds_before + time.time() - self._started

    def state(self) -> dict:
        """JSON-able state for a checkpoint (floats round-trip exactly through JSON)."""
        saved = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        saved["window_seconds"] = self.window_seconds + time.time() - self._window_started
        saved["seconds_before"] = self.train_seconds()
        return saved
