"""Which first tokens start the IDK word, on any tokenizer.

Derived from the tokenizer, never hard-coded; kept apart from :mod:`oprm_rag.scoring`
(which re-exports it) because the engine protocol's default ``idk_token_ids`` needs it
and the scoring rules need the engine protocol.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError

__all__ = ["IdkTokens", "idk_token_ids"]


def _round_trip(tokenizer: Any, text: str) -> tuple[list[int], str]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, tokenizer.decode(ids).strip()


class IdkTokens(frozenset):
    """The first tokens an IDK answer starts with (a ``frozenset`` of ids, as before), and
    what tells such an answer from an ordinary one when the word is several tokens.

    A one-token word (the shipped ``Error``) is decided on the first token alone, the
    paper's rule. A word of several tokens (``Erreur`` = ``E`` + ``rr`` + ``eur``; ``错误``
    = six byte tokens in a byte-level BPE, the first shared by every character from
    U+9000 to U+9FFF) starts like many ordinary answers, and may start with a token that
    is only a space: there :func:`confirm_idk` continues greedily from the chunk's state
    and calls it IDK only when the answer spells the whole word.
    """

    word: str
    #: first token id -> the word's token sequences starting with it, for words of several tokens
    continuations: dict[int, tuple[tuple[int, ...], ...]]

    def __new__(cls, ids: Any, word: str = "", continuations: dict[int, tuple[tuple[int, ...], ...]] | None = None
                ) -> "IdkTokens":
        self = super().__new__(cls, ids)
        self.word = word
        self.continuations = dict(continuations or {})
        return self

    def __reduce__(self) -> Any:  # frozenset pickles without attributes
        return (IdkTokens, (frozenset(self), self.word, self.continuations))

    @property
    def several_tokens(self) -> bool:
        return bool(self.continuations)


def idk_token_ids(tokenizer: Any, idk_word: str) -> IdkTokens:
    """First tokens an answer that is the IDK word starts with: bare and after a space.

    Derived from the tokenizer, never hard-coded. Compared as the tokenizer normalises
    (an uncased vocabulary lowercases ``Error``), and at the byte level: a first token
    that is part of a multi-byte character (Chinese IDK words in a byte-level BPE)
    decodes to U+FFFD alone and counts when the whole word round-trips. A first token
    that is only whitespace never counts as IDK by itself (it would make every answer
    look like IDK); it, and the first token of any word of several tokens, is kept in
    :attr:`IdkTokens.continuations` for :func:`confirm_idk` to decide with the rest.
    """
    if not isinstance(idk_word, str) or not idk_word.strip():
        raise InputError("idk_word must be a non-empty word")
    ids: set[int] = set()
    continuations: dict[int, set[tuple[int, ...]]] = {}
    for variant in (idk_word, " " + idk_word):
        toks, target = _round_trip(tokenizer, variant)
        if not toks or not target:
            continue
        first = toks[0]
        piece = tokenizer.decode([first]).strip()
        if len(toks) > 1:
            continuations.setdefault(int(first), set()).add(tuple(int(t) for t in toks))
        if not piece:
            continue
        partial_bytes = set(piece) == {"\ufffd"} and "\ufffd" not in target
        if target.startswith(piece) or partial_bytes:
            ids.add(int(first))
    if not ids and not continuations:
        raise InputError(f"the tokenizer cannot start the IDK word {idk_word!r} with a token of its own; "
                         "choose another idk_word")
    return IdkTokens(ids, idk_word, {k: tuple(sorted(v)) for k, v in continuations.items()})
