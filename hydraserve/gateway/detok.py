"""Incremental detokenization with stop strings."""
from __future__ import annotations

from hydraserve.tokenizer import Tokenizer


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    A delta is held back while the text ends in an incomplete UTF-8 sequence (decoded as U+FFFD)
    or in what could be the start of a stop string; once a stop string appears, the text is cut
    before it and ``stopped`` is set."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # text released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tok.decode(self.ids)
        return self._release(full, final=False)

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        return self._release(self.tok.decode(self.ids), final=True)

    def _release(self, full: str, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            i = full.find(s, max(0, len(self.text) - len(s)))
            if i != -1:
                self.stopped = True
                return self._emit(full[:i])
        if not final:
            if full.endswith("\ufffd"):
                return ""
            hold = max((k for s in self.stop for k in range(1, len(s))
                        if full.endswith(s[:k])), default=0)
            full = full[:len(full) - hold]
        return self._emit(full)

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        delta, self.text = upto[len(self.text):], upto
        return delta
