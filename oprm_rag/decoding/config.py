"""How to decode, and what came out: ``GenerationConfig``, ``Generation``, sampling.

Every decoding option, its default and its check live here once, as do the names
frameworks and the selector use for them (``GENERATION_ALIASES``): the selector's
``answer()``, the CLI, the web app, eval and both integrations read their defaults from
``GenerationConfig`` instead of writing their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..checks import check_int
from ..errors import OptionError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["GenerationConfig", "Generation", "GENERATION_ALIASES", "SELECTION_NAMES",
           "SUMMARY_MAX_NEW_TOKENS"]

#: Every name a caller may use for a decoding option, mapped to its ``GenerationConfig``
#: field: frameworks say ``max_tokens`` and ``top_k``; the selector, where ``top_k`` picks
#: chunks, says ``sample_top_k``.
GENERATION_ALIASES = {"max_new_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
                      "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "sample_top_k": "top_k",
                      "seed": "seed", "stop": "stop", "stop_at_eos": "stop_at_eos"}

#: Aliases that mean a *selection* option where a selector takes them (``top_k``: chunks).
SELECTION_NAMES = frozenset({"top_k"})

#: Answer length of a summary part (one per chunk): longer than a question's answer.
SUMMARY_MAX_NEW_TOKENS = 96


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
        def whole(name: str, value: Any, low: int) -> None:
            check_int(name, value, low, noun="a whole number")

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
        values: dict[str, Any] = {}
        for source in (defaults, overrides):
            for key, value in source.items():
                if key not in GENERATION_ALIASES or key == "stop":
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

    def generator(self, device: "torch.device") -> "torch.Generator | None":
        if self.temperature == 0 or self.seed is None:
            return None
        import torch

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
