"""The one text-stream type: every answer being decoded, in process or from a server.

``BaseTextStream`` turns a ``_pieces()`` generator into the stream every caller sees:
iterate for text pieces (iterating twice continues the same answer), ``close()`` stops
decoding early, ``text()`` runs to the end, ``result`` holds the :class:`Generation`.
The in-process ``TokenStream``, the served streams and the selector's ``AnswerStream``
all derive from it, so a caller never needs to know which one it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from .config import Generation

__all__ = ["BaseTextStream"]


class BaseTextStream(ABC):
    """An answer being decoded, over a ``_pieces()`` generator: iterating twice continues
    the same answer, ``close()`` stops decoding early, ``text()`` runs to the end.
    ``result`` is complete at the end; ``reused_tokens`` counts prompt tokens resumed from
    a handed-off state."""

    result: "Generation"
    reused_tokens: int = 0
    _iter: Iterator[str] | None = None

    @abstractmethod
    def _pieces(self) -> Iterator[str]:
        """The answer's text pieces as they are decoded (fills ``result`` as it goes)."""

    @property
    def handoff_hit(self) -> bool:
        return self.reused_tokens > 0

    def __iter__(self) -> Iterator[str]:
        if self._iter is None:
            self._iter = self._pieces()
        return self._iter

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()  # type: ignore[attr-defined]

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        for _ in self:
            pass
        return self._final_text()

    def _final_text(self) -> str:
        return self.result.text
