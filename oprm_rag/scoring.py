"""The selection rules of OPRM and the numbers they use.

Each chunk is scored by the entropy (nats, float32) of the model's first-answer-token
distribution after ``[P, C_i, Q]``. Chunks whose most likely first token starts the IDK
word are dropped (the question told the model to say it when the text lacks the
answer). The lowest-entropy survivor wins. Options: keep ``top_k``, also drop above an
entropy or an IDK-probability threshold, or rank by the probability of the question
given the chunk.

A row whose logits hold NaN or infinity (a float16 overflow does this) has no entropy:
it is flagged and can never win, whatever its arithmetic would say.
"""

from __future__ import annotations

import heapq
import logging
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .engine.types import FirstTokens
from .idk import IdkTokens, idk_token_ids
from .errors import InputError
from .results import ChunkScore, DropReason

if TYPE_CHECKING:  # pragma: no cover
    from .engine.base import Engine
    from .engine.types import Extension
    from .options import SelectorOptions

__all__ = ["first_token_stats", "idk_token_ids", "IdkTokens", "confirm_idk", "MAX_IDK_TOKENS", "question_logprob",
           "drop_reason", "CandidatePool",
           "nonfinite_rows"]

logger = logging.getLogger("oprm_rag")


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[b] bool: rows with NaN, +inf, or nothing finite at all (all -inf).

    ``-inf`` on some tokens is fine (masked vocabulary); the softmax still exists.
    """
    lg = logits.float()
    if bool(torch.isfinite(lg).all()):  # the common case, in one cheap pass (every decoding step)
        return torch.zeros(lg.shape[0], dtype=torch.bool, device=lg.device)
    return torch.isnan(lg).any(-1) | torch.isposinf(lg).any(-1) | ~torch.isfinite(lg).any(-1)


def first_token_stats(logits: torch.Tensor, idk_ids: Sequence[int] = ()) -> FirstTokens:
    """Entropy (nats), argmax, its probability and the IDK mass for float logits [b, v].

    Non-finite rows get NaN entropy, top id -1 and ``finite=False``.
    """
    lg = logits.float()
    bad = nonfinite_rows(lg)
    safe = torch.where(bad[:, None], torch.zeros_like(lg), lg)
    logp = torch.log_softmax(safe, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num(0.0).sum(-1)
    top_p, top = p.max(dim=-1)
    ids = sorted(set(int(i) for i in idk_ids))
    idk = p[:, ids].sum(-1) if ids else torch.zeros(lg.shape[0])
    nan = float("nan")
    finite = (~bad).tolist()
    return FirstTokens(
        entropy=[e if ok else nan for e, ok in zip(entropy.tolist(), finite)],
        top_id=[t if ok else -1 for t, ok in zip(top.tolist(), finite)],
        top_prob=[x if ok else nan for x, ok in zip(top_p.tolist(), finite)],
        idk_prob=[x if ok else nan for x, ok in zip(idk.tolist(), finite)],
        finite=finite,
    )


#: The most tokens :func:`confirm_idk` decodes to recognise an IDK word of several tokens.
MAX_IDK_TOKENS = 16


def confirm_idk(engine: "Engine", extension: "Extension", first: FirstTokens,
                idk_ids: frozenset[int]) -> list[bool]:
    """Per row of ``extension``: does the answer begin with the IDK word?

    One-token words: the top first token is one of ``idk_ids`` (the paper's rule, no
    model call). Words of several tokens (:class:`IdkTokens` with ``continuations``): the
    rows whose top token starts the word are continued greedily, batched, one token per
    model call, until the decoded answer spells the word (IDK), leaves it (not IDK), or
    :data:`MAX_IDK_TOKENS` are read; rows that are not finite are never IDK.
    """
    tops = [int(t) for t in first.top_id]
    finite = [bool(f) for f in first.finite]
    if not isinstance(idk_ids, IdkTokens) or not idk_ids.several_tokens:
        return [ok and t in idk_ids for t, ok in zip(tops, finite)]
    word = unicodedata.normalize("NFC", idk_ids.word.strip())
    verdict = [ok and t in idk_ids and t not in idk_ids.continuations for t, ok in zip(tops, finite)]
    live = [j for j, (t, ok) in enumerate(zip(tops, finite)) if ok and t in idk_ids.continuations]
    if not live:
        return verdict
    generated = {j: [tops[j]] for j in live}
    states = engine.select_states(extension.states, live)  # row k of states: answer live[k]
    for step in range(MAX_IDK_TOKENS):
        still = []
        for j in live:
            text = unicodedata.normalize("NFC", engine.decode(generated[j]).strip())
            if text.startswith(word):
                verdict[j] = True
            elif word.startswith(text.rstrip("\ufffd")):
                still.append(j)  # the word's start so far (or a character still being spelled)
        if not still or step == MAX_IDK_TOKENS - 1:
            break
        if len(still) != len(live):
            states = engine.select_states(states, [live.index(j) for j in still])
        live = still
        ext = engine.extend(states, [[generated[j][-1]] for j in live], logits="last")
        nxt = engine.first_tokens(ext, frozenset())
        ok = [k for k in range(len(live)) if nxt.finite[k]]  # scores that are not numbers give no verdict
        for k in ok:
            generated[live[k]].append(int(nxt.top_id[k]))
        states, live = ext.states, [live[k] for k in ok]
        if not live:
            break
        if len(ok) != len(still):
            states = engine.select_states(states, ok)
    return verdict


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
        ids = question_ids[r, start:].to(lp_first.device)
        total = lp_first[r, ids[0]]
        if len(ids) > 1:
            total = total + lp_rest[r, start:].gather(-1, ids[1:, None]).sum()
        out[r] = total
    return out


def drop_reason(score: ChunkScore, options: "SelectorOptions") -> DropReason | None:
    """Why ``score`` cannot be selected under ``options`` (None: it can)."""
    if not score.finite:
        return "nonfinite"
    if options.idk_filter and score.is_idk:
        return "idk"
    if options.idk_threshold is not None and score.idk_prob > options.idk_threshold:
        return "idk_threshold"
    if options.entropy_threshold is not None and score.entropy > options.entropy_threshold:
        return "entropy_threshold"
    return None


def badness(score: ChunkScore) -> float:
    """Lower is better: what the criterion ranks by, turned around."""
    return -score.relevance_score


@dataclass(order=True)
class _Entry:
    key: float
    seq: float
    item: Any = field(compare=False)


class CandidatePool:
    """Keeps the ``k`` best eligible candidates seen so far (and the best dropped one for
    the fallback).

    The selector streams over chunk batches and keeps only states that can still win,
    so memory depends on ``k`` and the state size, not on the document's length. A
    non-finite candidate is never kept, not even as the fallback.
    """

    def __init__(self, k: int, keep_fallback: bool) -> None:
        self.k = k
        self.keep_fallback = keep_fallback
        self._heap: list[_Entry] = []  # min-heap on -badness: the worst kept is on top
        self._fallback: _Entry | None = None

    def offer(self, score: ChunkScore, order: float, make: Callable[[], Any]) -> bool:
        """Keep the candidate ``make()`` builds if it can still win; ``order``: document
        position, earlier wins ties. ``make`` runs only for a kept candidate (it copies
        states out of their batch). Returns whether it was kept."""
        if not score.finite:
            return False
        if score.eligible:
            entry = _Entry(-badness(score), -order, None)  # greater is better
            if len(self._heap) < self.k:
                entry.item = make()
                heapq.heappush(self._heap, entry)
                return True
            if entry > self._heap[0]:
                entry.item = make()
                heapq.heapreplace(self._heap, entry)
                return True
            return False
        if self.keep_fallback:
            entry = _Entry(score.entropy, order, None)
            if self._fallback is None or entry < self._fallback:
                entry.item = make()
                self._fallback = entry
                return True
        return False

    def best(self) -> list[Any]:
        """Kept candidates, best first (ties: earlier in the document first)."""
        return [e.item for e in sorted(self._heap, reverse=True)]

    def fallback(self) -> Any | None:
        return self._fallback.item if self._fallback is not None else None
