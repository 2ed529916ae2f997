"""Chunk scores and the selection rules of OPRM.

Each chunk is scored by the entropy (nats, float32) of the model's first-answer-token
distribution after ``[P, C_i, Q]``. Chunks whose most likely first token starts the IDK
word are dropped (the question told the model to say it when the text lacks the
answer). The lowest-entropy survivor wins. Alternatives: keep ``top_k``, cut at an
entropy threshold, or rank by the probability of the question given the chunk.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["ChunkScore", "Criterion", "Fallback", "first_token_stats", "idk_token_ids",
           "question_logprob", "CandidatePool"]

Criterion = Literal["entropy", "question_likelihood"]
Fallback = Literal["min_entropy"] | None


@dataclass
class ChunkScore:
    """One scored chunk: where it is, what the model made of it, and (on request) its input."""

    doc_index: int
    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    entropy: float
    top_token_id: int
    top_token: str
    top_prob: float
    is_idk: bool
    question_logprob: float | None = None
    input_ids: list[int] | None = None
    selected: bool = False
    rank: int | None = None

    @property
    def relevance_score(self) -> float:
        """exp(-entropy) in (0, 1]: higher is better (1 = the model is certain)."""
        return math.exp(-self.entropy)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["relevance_score"] = self.relevance_score
        return d


def first_token_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy (nats), argmax and its probability for float logits [b, v], in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num(0.0).sum(-1)
    top_p, top = p.max(dim=-1)
    return entropy, top, top_p


def idk_token_ids(tokenizer: Any, idk_word: str) -> frozenset[int]:
    """First tokens of the IDK word as an answer would start: bare and after a space.

    Derived from the tokenizer, never hard-coded, so any model's vocabulary works.
    """
    ids: set[int] = set()
    for variant in (idk_word, " " + idk_word):
        toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if toks:
            first = toks[0]
            piece = tokenizer.decode([first]).strip()
            if piece and idk_word.startswith(piece):
                ids.add(int(first))
    if not ids:
        raise ValueError(f"the tokenizer cannot start the IDK word {idk_word!r} with one token")
    return frozenset(ids)


def question_logprob(chunk_end_logits: torch.Tensor, question_logits: torch.Tensor,
                     question_ids: torch.Tensor, pad_left: torch.Tensor | None = None) -> torch.Tensor:
    """log p(Q | P, C_i) per row: the chunk's last logits predict Q_0, Q's own predict the rest.

    ``chunk_end_logits`` [b, v]; ``question_logits`` [b, t, v] from running ``question_ids``
    [b, t] (left-padded by ``pad_left``) from the chunk's state.
    """
    b, t = question_ids.shape
    lp_first = torch.log_softmax(chunk_end_logits.float(), -1)
    lp_rest = torch.log_softmax(question_logits[:, :-1].float(), -1)
    out = torch.zeros(b)
    for r in range(b):
        start = int(pad_left[r]) if pad_left is not None else 0
        ids = question_ids[r, start:]
        total = lp_first[r, ids[0]]
        if len(ids) > 1:
            total = total + lp_rest[r, start:].gather(-1, ids[1:, None]).sum()
        out[r] = total
    return out


@dataclass(order=True)
class _Entry:
    key: float
    seq: int
    item: Any = field(compare=False)


class CandidatePool:
    """Keeps the ``k`` best candidates seen so far (and the best IDK one for fallback).

    The selector streams over chunk batches and keeps only states that can still win,
    so memory depends on ``k`` and the state size, not on the document's length.
    """

    def __init__(self, k: int, keep_fallback: bool) -> None:
        self.k = k
        self.keep_fallback = keep_fallback
        self._heap: list[_Entry] = []  # min-heap on -badness: the worst kept is on top
        self._fallback: _Entry | None = None

    def offer(self, badness: float, eligible: bool, entropy: float, order: float, item: Any) -> None:
        """``badness``: lower is better; ``order``: document position, earlier wins ties.

        Ineligible (IDK) items only compete to be the fallback.
        """
        if eligible:
            entry = _Entry(-badness, -order, item)  # greater is better
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, entry)
            elif entry > self._heap[0]:
                heapq.heapreplace(self._heap, entry)
        elif self.keep_fallback:
            entry = _Entry(entropy, order, item)
            if self._fallback is None or entry < self._fallback:
                self._fallback = entry

    def best(self) -> list[Any]:
        """Kept candidates, best first (ties: earlier in the document first)."""
        return [e.item for e in sorted(self._heap, reverse=True)]

    def fallback(self) -> Any | None:
        return self._fallback.item if self._fallback is not None else None
