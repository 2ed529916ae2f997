"""The decode loop: answers from stored states, token by token.

One loop serves every caller: ``Decoder`` decodes a batch of answers whose rows stop
independently (summaries decode every chunk at once); ``TokenStream`` is its batch-1
view, which streams text pieces as they are decoded (answers, chat wrappers). The
prompt is already inside the state, so only new tokens are fed, one step at a time:
``model.generate`` would re-feed the prompt on top of a passed state.

If the model's logits stop being finite (a float16 overflow), decoding stops with
:class:`~oprm_rag.errors.NonFiniteScoresError` instead of emitting token 0 forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..backends.base import call_threads
from ..errors import NonFiniteScoresError
from ..scoring import nonfinite_rows
from ..threads import intra_op_threads
from .config import Generation, GenerationConfig
from .stream import BaseTextStream
from .text import IncrementalTextAssembler

if TYPE_CHECKING:  # pragma: no cover
    from ..lm import RecurrentLM
    from ..state import RecurrentState

__all__ = ["Decoder", "TokenStream", "choose_next"]


class Decoder:
    """Decode ``b`` answers at once from a batch of states (rows stop independently).

    Iterate :meth:`pieces` for ``(row, text piece)`` as they are decoded; ``results``
    holds each row's :class:`Generation` (complete when iteration ends).
    """

    def __init__(self, lm: "RecurrentLM", states: "RecurrentState", logits: torch.Tensor,
                 config: GenerationConfig, prompt_tokens: Sequence[int] | None = None) -> None:
        b = states.batch_size
        logits = logits.reshape(b, -1)
        self.lm = lm
        self.config = config
        self.results = [Generation("", [], "length", int((prompt_tokens or [0] * b)[i])) for i in range(b)]
        self._states = states
        self._logits = logits

    def pieces(self) -> Iterator[tuple[int, str]]:
        lm, cfg = self.lm, self.config
        b = len(self.results)
        asms = [IncrementalTextAssembler(lm.tokenizer, cfg.stop) for _ in range(b)]
        generator = cfg.generator(lm.device)
        eos = lm.eos_token_ids if cfg.stop_at_eos else set()
        done = [cfg.max_new_tokens == 0] * b
        session = lm.backend.session(self._states)
        # Choosing a token is as small as the step: on torch's threads its parallel region
        # would leave an OpenMP thread spinning beside the step's own threads (at 130M on
        # 2 cores that halved decoding).
        threads = call_threads(lm.backend, b)
        logits = self._logits
        for step in range(cfg.max_new_tokens):
            _check_finite(logits, done, step)
            with intra_op_threads(threads):
                nxt = choose_next(logits, cfg, generator)
            for i, tid in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                res = self.results[i]
                if tid in eos:
                    res.finish_reason, done[i] = "eos", True
                    continue
                res.token_ids.append(tid)
                piece = asms[i].add(tid)
                res.text = asms[i].text
                if piece:
                    yield i, piece
                if asms[i].stopped:
                    res.finish_reason, done[i] = "stop", True
            if all(done) or step + 1 == cfg.max_new_tokens:
                break
            logits = lm.decode_step(session, nxt[:, None], active=b - sum(done))
        for i, asm in enumerate(asms):
            tail = asm.finish()
            self.results[i].text = asm.text
            if tail:
                yield i, tail

    def run(self) -> list[Generation]:
        """Decode to the end; every row's generation."""
        for _ in self.pieces():
            pass
        return self.results


def _check_finite(logits: torch.Tensor, done: list[bool], step: int) -> None:
    bad = nonfinite_rows(logits).tolist()
    if any(b and not d for b, d in zip(bad, done)):
        raise NonFiniteScoresError(
            f"the model's logits became NaN or infinite at decoding step {step}; nothing after this point "
            "can be trusted. Load the model in float32 or bfloat16 (dtype=...) instead of float16.")


class TokenStream(BaseTextStream):
    """One answer being decoded: iterate for text pieces; ``result`` holds the whole answer.

    ``reused_tokens`` counts prompt tokens resumed from a handed-off state (0: none).
    """

    def __init__(self, lm: "RecurrentLM", state: "RecurrentState", logits: torch.Tensor,
                 config: GenerationConfig | None = None, prompt_tokens: int = 0, reused_tokens: int = 0) -> None:
        if state.batch_size != 1:
            raise ValueError("TokenStream decodes one sequence; use Decoder for batches")
        self.lm = lm
        self._decoder = Decoder(lm, state, logits, config or GenerationConfig(), [prompt_tokens])
        self.reused_tokens = reused_tokens

    @property
    def result(self) -> Generation:  # type: ignore[override]
        return self._decoder.results[0]

    def _pieces(self) -> Iterator[str]:
        return (piece for _, piece in self._decoder.pieces())


def choose_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row from float32 logits [b, v]."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) > cfg.top_p  # keep the first token always
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
