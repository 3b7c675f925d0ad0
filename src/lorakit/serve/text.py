"""From generated token ids to the text a client sees, piece by piece, with OpenAI's `stop` strings.

The whole answer is decoded again after every token (special tokens dropped) and the new part is sent,
minus what may still change: a trailing incomplete UTF-8 character (decoded as U+FFFD until its last
byte arrives) and a tail that could be the start of a stop string. The pieces therefore add up exactly to
the decoding of all tokens, cut before the first stop string.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class TextState:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was found; nothing more will be sent

    def add(self, tokens: list[int]) -> str:
        """Take new tokens; return the text that can be sent now."""
        if self.stopped or not tokens:
            return ""
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_position(text)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut])
        end = len(text.rstrip(REPLACEMENT_CHAR)) if text.endswith(REPLACEMENT_CHAR) else len(text)
        end -= self._partial_stop(text[:end])
        return self._advance(text[:end])

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._advance(text)

    @property
    def text(self) -> str:
        return self.sent

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.sent) or len(visible) <= len(self.sent):
            return ""
        piece, self.sent = visible[len(self.sent):], visible
        return piece

    def _stop_position(self, text: str) -> int | None:
        # only text not sent yet (plus a stop string's length before it) can hold a new match
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        found = [p for p in (text.find(s, start) for s in self.stop) if p >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of text that is the beginning of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
