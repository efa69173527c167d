"""Incremental detokenization with stop strings."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

from hydraserve.tokenizer import Tokenizer


class Detokenizer:
    """Turns a growing list of token ids into text deltas that add up to decoding them all at once.

    A delta is held back while the text ends in an incomplete UTF-8 sequence (decoded as U+FFFD)
    or in what could be the start of a stop string; once a stop string appears, the text is cut
    before it and ``stopped`` is set.

    A token costs work in proportion to the few tokens around it, not to the answer so far:
    ``tokenizers``' DecodeStream commits the text chunk by chunk, decoding only its last chunk's
    ids with the new ones, and only the text not released yet is searched for stop strings (none
    can start in released text: the longest ending that could start one is always held back)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None,
                 min_tokens: int = 0):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.min_tokens = min_tokens  # stop strings count from this many tokens on (as vLLM's)
        self.stopped = False
        # The tokenizers.Tokenizer the stream steps with. A decoder that rewrites text it gave
        # (byte fallback meeting an invalid sequence) makes the stream fail; from then on each
        # step decodes all the ids (see _step).
        self._backend = tokenizer.backend
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._chunk = 0  # ids[_chunk:_pending] gave the last chunk of committed text
        self._pending = 0  # ids[_pending:] are not committed: no text yet, or a partial character
        self._committed = 0  # characters committed
        self._held = ""  # committed text not released yet: it may start a stop string

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self.stopped:
            return ""
        return self._release(self._step(), final=False)

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        if self.stopped:
            return ""
        text = self._release(self._uncommitted(), final=True)
        self._pending = len(self._ids)  # a second flush has nothing left to release
        return text

    def _step(self) -> str:
        """Decode the newest id: commit what text it completes and return the text of the ids
        still uncommitted (empty, or ending in a partial character)."""
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, self._ids[-1])
            except Exception:  # "Invalid prefix": the decoder rewrote text it had given
                self._stream = None
            else:
                if chunk is None:
                    return self._uncommitted()
                self._commit(chunk)
                return ""
        tail = self._uncommitted()
        if not tail or tail.endswith("\ufffd"):
            return tail
        self._commit(tail)
        return ""

    def _commit(self, text: str) -> None:
        self._held += text
        self._committed += len(text)
        self._chunk, self._pending = self._pending, len(self._ids)

    def _uncommitted(self) -> str:
        """The text the uncommitted ids add: decoded after the last chunk's ids, as the stream
        does, or, where that does not extend the chunk's text, after all the ids before them."""
        if self._pending == len(self._ids):
            return ""
        if self._stream is not None:
            window = self._ids[self._chunk:self._pending]
            before = self.tok.decode(window)
            after = self.tok.decode(window + self._ids[self._pending:])
            if after.startswith(before):
                return after[len(before):]
        return self.tok.decode(self._ids)[self._committed:]

    def _release(self, tail: str, final: bool) -> str:
        """Release the text not released yet (``_held`` + ``tail``, the uncommitted text): up to
        a stop string; else all of it if ``final``; else, once nothing is uncommitted, all but
        what may be the start of a stop string."""
        text = self._held + tail
        stop = self.stop if len(self._ids) >= self.min_tokens else []
        for s in stop:
            i = text.find(s)
            if i != -1:
                self.stopped = True
                self._held = ""
                return text[:i]
        if final:
            self._held = ""
            return text
        if tail:
            return ""
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold]
