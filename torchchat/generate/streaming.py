"""Turning a stream of token ids into a stream of text, one piece per token where possible."""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class TextStreamer:
    """Incremental detokenizer.

    Decoding tokens one by one breaks two things: sentencepiece drops the leading space of a
    piece decoded alone, and a multi-byte character split over tokens decodes as U+FFFD. So each
    step decodes the pending ids together with the token before them (``context``) and keeps the
    new part, holding back text that still ends in an incomplete character.
    """

    def __init__(self, tokenizer, context: Sequence[int] = (), skip_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.context = list(context)[-1:]
        self.skip_ids = skip_ids
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        if token in self.skip_ids:
            return ""
        self.pending.append(token)
        text = self._decode_pending()
        if text.endswith(REPLACEMENT) and len(self.pending) < 8:
            return ""  # wait for the rest of a multi-byte character
        self.context, self.pending = self.pending[-1:], []
        return text

    def flush(self) -> str:
        text = self._decode_pending() if self.pending else ""
        self.pending = []
        return text

    def _decode_pending(self) -> str:
        if not self.context:
            return self.tokenizer.decode(self.pending)
        before = self.tokenizer.decode(self.context)
        both = self.tokenizer.decode(self.context + self.pending)
        return both[len(before):] if both.startswith(before) else self.tokenizer.decode(self.pending)
