"""Token ids to text while decoding: the reference assembler and the constant-time one.

:class:`TextAssembler` (the reference) re-decodes the whole answer at every token,
because tokenizers merge bytes across tokens (a multi-byte character split over byte
tokens, SentencePiece's word-initial spaces, WordPiece's ``##`` joins). That is
O(n) per token and O(n^2) per answer: at 256 tokens it costs a fifth of a decode
step of the shipped model. :class:`IncrementalTextAssembler` keeps the same contract
(``add`` returns the new text that is safe to show, stop strings cut the answer and
are held back until resolved, an incomplete UTF-8 tail waits for its next byte) and
decodes only a short window: the tokens since the last *commit point* plus the
tokens before it as context, and takes the text that the new tokens add to the
context's own decoding.

That difference equals the full decoding whenever decoding is local over the window,
which holds for byte-level BPE, SentencePiece (Metaspace) and WordPiece decoders; the
tests compare against the full decoding on each. It is checked as it goes: if the
context no longer decodes to the text it gave when it was committed, the assembler
re-decodes everything and starts a new window. :meth:`finish` compares the result
with one full decoding and takes that (with a warning) where they still differ.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable


__all__ = ["TextAssembler", "IncrementalTextAssembler", "COMMIT_EVERY", "CONTEXT_TOKENS"]

class TextAssembler:
    """Turns a growing list of token ids into safe text deltas.

    It re-decodes the whole answer each step (tokenizers merge bytes across tokens),
    holds back an incomplete UTF-8 tail and any text that might be the start of a stop
    string, and cuts the answer at the first stop string.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def _current_text(self) -> str:
        """The whole answer's text so far (here: a full decoding; see ``IncrementalTextAssembler``)."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show (maybe empty)."""
        self.ids.append(token_id)
        text = self._current_text()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._release(cut)
        self.text = text
        safe = len(text) - self._held_back(text)
        # A trailing U+FFFD is an incomplete multi-byte character: wait for the next token.
        safe = min(safe, len(text.rstrip("\ufffd")))
        return self._release(safe)

    def finish(self) -> str:
        """Everything not yet emitted (at the end of decoding)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best


logger = logging.getLogger("oprm_rag")

#: Tokens between commit points, and tokens of context kept before one: each ``add``
#: decodes about CONTEXT_TOKENS + COMMIT_EVERY tokens, whatever the answer's length.
COMMIT_EVERY = 4
CONTEXT_TOKENS = 4


class IncrementalTextAssembler(TextAssembler):
    """A :class:`TextAssembler` that decodes a short window per token instead of the whole answer."""

    def __init__(self, tokenizer: Any, stop: Iterable[str] = (), commit_every: int = COMMIT_EVERY,
                 context_tokens: int = CONTEXT_TOKENS) -> None:
        super().__init__(tokenizer, stop)
        if commit_every < 1 or context_tokens < 1:
            raise ValueError("commit_every and context_tokens must be >= 1")
        self.commit_every, self.context_tokens = commit_every, context_tokens
        self._context = 0  # first token of the decoding window
        self._commit = 0  # tokens whose text is final: self._done == decode(ids[:commit])
        self._done = ""
        self._head = ""  # decode(ids[context:commit]): what the window's context decodes to
        self.full_decodes = 0  # times the window was abandoned for a full decoding (for tests)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _current_text(self) -> str:
        tail = self._decode(self.ids[self._context:])
        if tail.startswith(self._head):
            text = self._done + tail[len(self._head):]
        else:  # the context decodes differently with the new tokens after it: decode everything
            self.full_decodes += 1
            text = self._decode(self.ids)
            self._context = self._commit = 0
            self._done = self._head = ""
        n = len(self.ids)
        if n - self._commit >= self.commit_every and not text.endswith("\ufffd"):
            self._commit, self._done = n, text
            self._context = max(0, n - self.context_tokens)
            self._head = self._decode(self.ids[self._context:n])
        return text

    def finish(self) -> str:
        """Everything not yet emitted; the text is checked against one full decoding."""
        if not self.stopped and self.ids:
            full = self._decode(self.ids)
            if full != self.text:
                if full.startswith(self.text[:self.emitted]):
                    logger.warning("oprm_rag: incremental detokenisation differed from the full decoding; "
                                   "using the full decoding")
                    self.text = full
                else:  # cannot happen for the decoders tested; keep what the stream showed
                    logger.warning("oprm_rag: incremental detokenisation differed from the full decoding after "
                                   "text was shown; the shown text is kept")
        return self._release(len(self.text))
