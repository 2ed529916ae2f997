"""Decoding from a stored state: sampling, stop strings and incremental detokenisation.

Decoding is ours rather than ``model.generate`` because generate re-feeds the whole
prompt on top of a passed state, ignores ``past_key_values`` on these models and is
wrong for batched RWKV. Here the prompt is already inside the state and only new
tokens are fed, one at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = ["GenerationConfig", "Generation", "TextAssembler", "choose_next", "GENERATION_ALIASES"]

#: The names frameworks use for decoding options, mapped to ``GenerationConfig`` fields.
GENERATION_ALIASES = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens",
                      "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed",
                      "stop_at_eos": "stop_at_eos"}


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Greedy unless ``temperature > 0``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        from .errors import OptionError

        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionError(f"{name} must be a whole number, got {value!r}")
            if value < low:
                raise OptionError(f"{name} must be >= {low}, got {value}")

        whole("max_new_tokens", self.max_new_tokens, 0)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise OptionError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise OptionError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None:
            whole("top_k", self.top_k, 1)
        if self.seed is not None:
            whole("seed", self.seed, 0)
        if not isinstance(self.stop_at_eos, bool):
            raise OptionError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(x, str) for x in stop):
            raise OptionError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(not x for x in stop):
            raise OptionError("stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(stop))

    @classmethod
    def from_call(cls, defaults: Mapping[str, Any], overrides: Mapping[str, Any],
                  stop: str | Sequence[str] | None = None) -> "GenerationConfig":
        """A wrapper's configuration: its fields (``defaults``) overridden by one call's
        keyword arguments, both under framework names (``max_tokens``...; see
        ``GENERATION_ALIASES``); ``None`` values are ignored. An unknown name raises
        instead of being dropped: a misspelt option silently ignored would change what
        the model does without telling anyone. ``stop`` is the final list of stop strings.
        """
        from .errors import OptionError

        values: dict[str, Any] = {}
        for source in (defaults, overrides):
            for key, value in source.items():
                if key not in GENERATION_ALIASES:
                    raise OptionError(f"unsupported generation argument {key!r}; supported: "
                                      f"{sorted(GENERATION_ALIASES)} and stop")
                if value is not None:
                    values[GENERATION_ALIASES[key]] = value
        return cls.make(stop=stop, **values)

    @classmethod
    def make(cls, stop: str | Sequence[str] | None = None, **kwargs) -> "GenerationConfig":
        if isinstance(stop, str):
            stop = (stop,)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return cls(stop=tuple(stop or ()), **kwargs)

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.temperature == 0 or self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


@dataclass
class Generation:
    """A finished answer: text, its tokens, why it stopped, and token counts."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (stop string), "eos", "length"
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


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
