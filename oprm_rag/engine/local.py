"""The in-process engines: a ``RecurrentLM`` in this process, and what is kept per model.

A ``RecurrentLM`` loads, tokenises and runs forward passes from explicit states. What the
selector and the wrappers keep *about* a model lives in its engine, one per model
(:func:`engine_for`):

* the memo of instruction-prefix states (P is computed once per process);
* the memo of recent documents' tokenisations (a follow-up question needs the token
  ids again, and re-tokenising a long document would cost more than the follow-up);
* the document state cache (question-independent chunk states) and the state handoff
  (the winning chunk's state, for a chat wrapper to resume from): only where states are
  exact (:class:`LocalEngine`, a :class:`~oprm_rag.engine.base.StatefulEngine`);
* the prompt service of the chat wrappers (``start_prompt``/``complete``), which resumes
  from a handed-off state where there is one.

A model whose states cannot be continued exactly runs on :class:`ReplayEngine`: its
"state" is the token prefix, replayed per chunk, so nothing is worth caching.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..chunking import as_int32
from ..decoding.config import Generation, GenerationConfig
from ..decoding.loop import Decoder, TokenStream
from ..errors import InputError
from ..lm import RecurrentLM
from ..scoring import first_token_stats, idk_token_ids, question_logprob
from ..state import RecurrentState
from .base import ChunkSize, Engine, EngineInfo, Extension, FirstTokens, LogitsWanted, QuestionLikelihood, \
    StatefulEngine
from .handoff import HandoffEntry, StateHandoff

if TYPE_CHECKING:  # pragma: no cover
    from ..storage.cache import DocumentStateCache

__all__ = ["InProcessEngine", "LocalEngine", "ReplayEngine", "PromptStart", "engine_for"]

_ENCODED_MAX_BYTES = 128 * 2**20  # recent tokenisations kept (each at most 1/4 of this)
_PREFIX_STATES = 8


class PromptStart:
    """A prompt run up to its last token: the state, the next-token logits [1, v], its ids,
    and how many of those tokens were resumed from a handed-off state (0: none)."""

    def __init__(self, state: RecurrentState, logits: torch.Tensor, ids: list[int], reused_tokens: int) -> None:
        self.state = state
        self.logits = logits
        self.ids = ids
        self.reused_tokens = reused_tokens

    @property
    def handoff_hit(self) -> bool:
        return self.reused_tokens > 0


class InProcessEngine(Engine, QuestionLikelihood):
    """The engine over one in-process ``RecurrentLM`` (get it with :func:`engine_for` or
    ``oprm_rag.resolve(lm)``): everything both in-process engines share."""

    def __init__(self, lm: RecurrentLM) -> None:
        self.lm = lm
        self._lock = threading.RLock()
        self._prefixes: "OrderedDict[tuple[int, ...], Extension]" = OrderedDict()
        self._encoded: "OrderedDict[tuple[int, str], tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._encoded_bytes = 0
        self._idk: dict[str, frozenset[int]] = {}
        self._info: EngineInfo | None = None

    # ------------------------------------------------------------------ identity
    def describe(self) -> EngineInfo:
        """The model's facts (computed once: a loaded model does not change)."""
        with self._lock:
            if self._info is None:
                from ..capacity import auto_chunk_tokens

                lm = self.lm
                size = auto_chunk_tokens(lm)
                self._info = EngineInfo(name=str(lm.name), identity=lm.identity, prompt=lm.prompt,
                                        auto_chunk=ChunkSize(size.chunk_tokens, size.reason),
                                        vocab_size=lm.vocab_size, position_limit=lm.position_limit,
                                        can_pad=bool(lm.backend.supports_left_padding), family=lm.family)
            return self._info

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return self.lm.encode(text)

    def encode_prefix(self, text: str, *, chat: bool = False) -> list[int]:
        # A rendered chat turn carries its own special tokens; a raw prompt gets the
        # tokenizer's (BOS) as a plain sequence start would.
        return self.lm.encode(text, add_special_tokens=not chat)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Memoised (bounded in bytes): callers get their own int64 copies of the arrays.

        The memo keeps int32 (12 bytes a token, half of int64), so that a follow-up question
        about a document of over a million tokens does not tokenise it again: at 1M tokens
        that was half the follow-up's time.
        """
        key = (len(text), hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest())
        with self._lock:
            hit = self._encoded.get(key)
            if hit is not None:
                self._encoded.move_to_end(key)
                return hit[0].astype(np.int64), hit[1].astype(np.int64)
        ids, offsets = self.lm.encode_with_offsets(text)
        size = (ids.size + offsets.size) * 4
        if size <= _ENCODED_MAX_BYTES // 4:  # a huge document is not kept: memory stays bounded
            try:  # the chunker's own int32 conversion: what it cannot hold, chunking refuses too
                # (new arrays: the model returns int64, so they are not views of the caller's)
                compact = (as_int32(ids), as_int32(offsets))
            except ValueError:
                return ids, offsets
            with self._lock:
                if key not in self._encoded:
                    self._encoded[key] = compact
                    self._encoded_bytes += size
                while self._encoded_bytes > _ENCODED_MAX_BYTES:
                    _, (old_ids, old_offsets) = self._encoded.popitem(last=False)
                    self._encoded_bytes -= old_ids.nbytes + old_offsets.nbytes
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self.lm.decode(ids)

    def idk_token_ids(self, idk_word: str) -> frozenset[int]:
        with self._lock:
            hit = self._idk.get(idk_word)
        if hit is None:
            hit = idk_token_ids(self.lm.tokenizer, idk_word)
            with self._lock:
                self._idk[idk_word] = hit
        return hit

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        tok = self.lm.tokenizer
        if not getattr(tok, "chat_template", None):
            return None
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def forget(self) -> None:
        """Drop the prefix-state and tokenisation memos (a cold start, as a benchmark wants)."""
        with self._lock:
            self._prefixes.clear()
            self._encoded.clear()
            self._encoded_bytes = 0

    # ------------------------------------------------------------------ running
    def start(self, prefix_ids: Sequence[int]) -> Extension:
        key = tuple(int(i) for i in prefix_ids)
        with self._lock:
            hit = self._prefixes.get(key)
            if hit is not None:
                self._prefixes.move_to_end(key)
                return hit
        if key:
            out = self.lm.prefill(key)
            ext = Extension(out.state, out.logits.reshape(1, -1))
        else:
            ext = Extension(self.lm.backend.empty_state(1), torch.zeros(1, self.lm.vocab_size))
        with self._lock:
            self._prefixes[key] = ext
            while len(self._prefixes) > _PREFIX_STATES:
                self._prefixes.popitem(last=False)
        return ext

    def extend(self, states: RecurrentState | None, rows: Sequence[Sequence[int]], *,
               logits: LogitsWanted = "last") -> Extension:
        if not rows:
            raise ValueError("extend needs at least one row")
        if states is None:
            states = self.lm.backend.empty_state(1)
        if states.batch_size not in (1, len(rows)):
            raise ValueError(f"{states.batch_size} states for {len(rows)} rows")
        if states.batch_size == 1 and len(rows) > 1:
            states = states.expand(len(rows))
        ids, pads = self._padded(rows)
        if logits == "none" and not isinstance(self, StatefulEngine):
            # Token replay: the "state" is the prefix itself; appending runs nothing.
            return Extension(self.lm.backend.append(states, ids), None)
        if len(rows) == 1 and logits == "last" and ids.shape[1] > self.lm.prefill_slice:
            out = self.lm.prefill(rows[0], states)  # one long row: in slices, bounded memory
            return Extension(out.state, out.logits.reshape(1, -1))
        out = self.lm.forward(ids, states, all_logits=logits == "all", pad_left=pads)
        return Extension(out.state, out.logits if logits != "none" else None, pads)

    def _padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows as one [b, t] tensor, left-padded where lengths differ (the backend must take pads)."""
        width = max(len(r) for r in rows)
        lengths = {len(r) for r in rows}
        if min(lengths) == 0:
            raise ValueError("every row needs at least one token")
        if len(lengths) > 1 and not self.lm.backend.supports_left_padding:
            raise ValueError(f"the {self.lm.family} backend takes rows of one length per call")
        pad_id = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        pads = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.as_tensor(np.asarray(row, dtype=np.int64))
        return ids, (pads if bool((pads > 0).any()) else None)

    def cat_states(self, states: Sequence[RecurrentState]) -> RecurrentState:
        # cached states live on the CPU: bring every part to the model's device first
        return RecurrentState.cat([s.to(self.lm.device) for s in states])

    def first_tokens(self, extension: Extension, idk_ids: frozenset[int]) -> FirstTokens:
        logits = extension.logits
        if logits.dim() == 3:
            logits = logits[:, -1]
        return first_token_stats(logits, idk_ids)

    def row_logits(self, extension: Extension, row: int) -> torch.Tensor:
        logits = extension.logits
        return logits[row, -1] if logits.dim() == 3 else logits[row]

    def question_logprobs(self, chunk_end_logits: torch.Tensor, question: Extension,
                          rows: Sequence[Sequence[int]]) -> list[float]:
        """log p(Q | P, C_i) per row, from the chunk-end logits and the question pass's
        full logits (``logits="all"``)."""
        ids, pads = self._padded(rows)
        return question_logprob(chunk_end_logits, question.logits, ids, pads).tolist()

    def stream(self, state: RecurrentState, logits: torch.Tensor, config: GenerationConfig, *,
               prompt_tokens: int = 0) -> TokenStream:
        return TokenStream(self.lm, state, logits, config, prompt_tokens)

    def generate_batch(self, states: RecurrentState, logits: Sequence[torch.Tensor], config: GenerationConfig,
                       prompt_tokens: Sequence[int] | None = None) -> list[Generation]:
        stacked = logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits))
        return Decoder(self.lm, states, stacked, config, prompt_tokens).run()

    # ------------------------------------------------------------------ prompts (chat wrappers)
    def _handed_off(self, ids: Sequence[int]) -> HandoffEntry | None:
        """The handed-off state that ``ids`` starts with (none where states are not exact)."""
        return None

    def _handed_off_text(self, prompt: str) -> HandoffEntry | None:
        return None

    def prompt_ids(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for a prompt; one that starts with a handed-off text reuses its exact ids
        (tokenising the whole prompt could merge tokens across where P, C and Q were cut)."""
        if not isinstance(prompt, str):
            return [int(i) for i in prompt]
        entry = self._handed_off_text(prompt)
        if entry is not None:
            rest = prompt[len(entry.text or ""):]
            return list(entry.ids) + (self.lm.encode(rest) if rest else [])
        return self.lm.encode(prompt, add_special_tokens=add_special_tokens)

    def start_prompt(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> PromptStart:
        """Run ``prompt`` to its last token, resuming from a handed-off state when it begins
        with one the selector just scored (then only the rest is prefilled)."""
        ids = self.prompt_ids(prompt, add_special_tokens=add_special_tokens)
        if not ids:
            raise InputError("the prompt is empty: the model needs at least one token to continue from")
        entry = self._handed_off(ids)
        if entry is None:
            out = self.lm.prefill(ids)
            return PromptStart(out.state, out.logits.reshape(1, -1), ids, 0)
        rest = ids[entry.num_tokens:]
        if rest:
            out = self.lm.prefill(rest, entry.state)
            return PromptStart(out.state, out.logits.reshape(1, -1), ids, entry.num_tokens)
        return PromptStart(entry.state, entry.logits.reshape(1, -1), ids, entry.num_tokens)

    def complete(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, *,
                 add_special_tokens: bool = True) -> TokenStream:
        """Stream a completion of ``prompt``, resuming from a handed-off state if one matches."""
        started = self.start_prompt(prompt, add_special_tokens=add_special_tokens)
        return TokenStream(self.lm, started.state, started.logits, config, prompt_tokens=len(started.ids),
                           reused_tokens=started.reused_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.lm!r})"


class LocalEngine(InProcessEngine, StatefulEngine):
    """The engine over a model whose states are exact and fixed-size: the document cache,
    ``prepare()``, the handoff and decoding from a stored state all work."""

    def __init__(self, lm: RecurrentLM, handoff_bytes: int = 256 * 2**20) -> None:
        super().__init__(lm)
        self.handoff = StateHandoff(max_bytes=handoff_bytes)
        self._cache: "DocumentStateCache | None" = None

    @property
    def state_nbytes(self) -> int:
        return self.lm.state_nbytes

    def state_nbytes_at(self, tokens: int) -> int:
        return self.lm.backend.state_nbytes(tokens)

    def has_prefix(self, prefix_ids: Sequence[int]) -> bool:
        with self._lock:
            return tuple(int(i) for i in prefix_ids) in self._prefixes

    def document_cache(self) -> "DocumentStateCache":
        """The cache shared by every selector on this model (made on first use)."""
        with self._lock:
            if self._cache is None:
                from ..storage.cache import DocumentStateCache

                self._cache = DocumentStateCache()
            return self._cache

    def use_document_cache(self, cache: "DocumentStateCache | None" = None, *, max_bytes: int | None = None,
                           directory: str | Path | None = None) -> "DocumentStateCache":
        """Replace the shared cache: with ``cache``, or a new one with ``max_bytes`` / ``directory``."""
        if cache is None:
            from ..storage.cache import DocumentStateCache

            kwargs: dict[str, Any] = {"directory": directory}
            if max_bytes is not None:
                kwargs["max_bytes"] = max_bytes
            cache = DocumentStateCache(**kwargs)
        with self._lock:
            self._cache = cache
        return cache

    def remember(self, ids: Sequence[int], state: RecurrentState, logits: torch.Tensor,
                 text: str | None = None) -> None:
        self.handoff.remember(ids, state, logits, text=text)

    def _handed_off(self, ids: Sequence[int]) -> HandoffEntry | None:
        return self.handoff.lookup(ids)

    def _handed_off_text(self, prompt: str) -> HandoffEntry | None:
        return self.handoff.lookup_text(prompt)


class ReplayEngine(InProcessEngine):
    """The engine over a model on the token-replay backend: every chunk is a full prefill
    of ``[P, C_i, Q]`` (exact by construction), and there is no state worth caching."""


_ENGINES: "weakref.WeakKeyDictionary[RecurrentLM, InProcessEngine]" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(lm: RecurrentLM) -> InProcessEngine:
    """The one engine over ``lm`` in this process (made on first use; it lives as long as ``lm``)."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(lm)
        if engine is None:
            engine = LocalEngine(lm) if lm.backend.exact_continuation else ReplayEngine(lm)
            _ENGINES[lm] = engine
        return engine
