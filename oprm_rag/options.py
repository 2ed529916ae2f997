"""Every selector option, its default and its check, in one frozen object.

The core ``OPRMSelector``, the CLI, the web app, LangChain and LlamaIndex all build a
:class:`SelectorOptions`; none keeps defaults or checks of its own. So the same
document and question give the same chunks and the same answer whatever the entry
point. The integrations derive their pydantic fields from :func:`option_specs`.

The default chunk length is the model's (``chunk_tokens="auto"``): the Stuffed-Mamba
capacity law where it applies, else the training length recorded with the model, else
the paper's 2000 tokens (see :mod:`oprm_rag.capacity`). ``chunk_tokens=None`` means
plain inference: each document whole, in one state. The resolved length and its reason
are reported in every result's ``usage``.

Selection options and generation options never share a path: ``top_k`` here is how
many chunks to select; sampling's top-k is ``GenerationConfig.top_k``, passed to
``answer()`` as ``sample_top_k``.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, Mapping, Union

from .checks import check_bool, check_choice, check_float, check_int
from .decoding.config import GENERATION_ALIASES
from .errors import OptionError

if TYPE_CHECKING:  # pragma: no cover
    from .engine.types import ChunkSize, EngineInfo
    from .prompts import PromptTemplate

__all__ = ["SelectorOptions", "OptionSpec", "option_specs", "parse_chunk_tokens", "check_names", "Boundary",
           "Criterion", "Fallback", "ChunkTokens", "MIN_CHUNK_TOKENS"]

Boundary = Literal["paragraph", "sentence"]
Criterion = Literal["entropy", "question_likelihood"]
Fallback = Union[Literal["min_entropy"], None]
ChunkTokens = Union[int, Literal["auto"], None]

#: Below this a chunk holds too little text to answer from; it is refused.
MIN_CHUNK_TOKENS = 8



def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class SelectorOptions:
    """OPRM selection settings. Construct with keywords; every value is checked here.

    See each field's ``doc`` (``option_specs()``) for what it does.
    """

    chunk_tokens: ChunkTokens = field(default="auto", metadata=_doc(
        "Chunk length in model tokens; 'auto' = the model's own (capacity law, else its training length, "
        "else 2000); None = whole documents (plain inference)."))
    chunk_overlap: int = field(default=0, metadata=_doc("Tokens repeated from the end of the previous chunk."))
    boundary: Boundary | None = field(default="sentence", metadata=_doc(
        "End chunks at a 'sentence' or 'paragraph' end where one lies within boundary_tolerance of the chunk "
        "length; None cuts at exactly chunk_tokens."))
    boundary_tolerance: float = field(default=0.15, metadata=_doc(
        "Share of the chunk length, at its end, searched for a boundary."))
    top_k: int = field(default=1, metadata=_doc(
        "How many chunks to select (answers re-join them in document order)."))
    criterion: Criterion = field(default="entropy", metadata=_doc(
        "'entropy': the lowest first-answer-token entropy wins (the paper's rule); 'question_likelihood': "
        "the highest log p(question | chunk) wins."))
    idk_filter: bool = field(default=True, metadata=_doc(
        "Drop chunks whose most likely first answer token starts the IDK word (the paper's rule)."))
    idk_word: str | None = field(default=None, metadata=_doc(
        "The IDK word; None = the model prompt's (usually 'Error')."))
    idk_threshold: float | None = field(default=None, metadata=_doc(
        "Also drop chunks whose probability of starting the IDK word exceeds this (0-1]; None = off."))
    entropy_threshold: float | None = field(default=None, metadata=_doc(
        "Also drop chunks whose entropy (nats) exceeds this; None = off."))
    fallback: Fallback = field(default=None, metadata=_doc(
        "'min_entropy': when every chunk is dropped, answer from the lowest-entropy one anyway; None = answer "
        "the IDK word."))
    max_batch_tokens: int = field(default=16384, metadata=_doc(
        "Rows x tokens per model call (bounds activation memory)."))
    cache: bool = field(default=True, metadata=_doc(
        "Keep question-independent chunk states in the model's document cache (follow-ups cost only the "
        "question)."))
    show_progress: bool = field(default=False, metadata=_doc("Show a progress bar over scored chunks."))
    prompt: "PromptTemplate | None" = field(default=None, metadata=_doc(
        "How chunk and question become model input; None = the model's own (its folder's oprm_prompt.json)."))

    def __post_init__(self) -> None:
        _check_chunk_tokens(self.chunk_tokens)
        check_int("chunk_overlap", self.chunk_overlap, low=0)
        if isinstance(self.chunk_tokens, int) and self.chunk_overlap >= self.chunk_tokens:
            raise OptionError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens "
                              f"({self.chunk_tokens})")
        check_choice("boundary", self.boundary, ("paragraph", "sentence", None))
        check_float("boundary_tolerance", self.boundary_tolerance, low=0.0, high=1.0)
        check_int("top_k", self.top_k, low=1)
        check_choice("criterion", self.criterion, ("entropy", "question_likelihood"))
        check_bool("idk_filter", self.idk_filter)
        if self.idk_word is not None and (not isinstance(self.idk_word, str) or not self.idk_word.strip()):
            raise OptionError(f"idk_word must be a non-empty string or None, got {self.idk_word!r}")
        if self.idk_threshold is not None:
            check_float("idk_threshold", self.idk_threshold, low=0.0, high=1.0, low_open=True)
        if self.entropy_threshold is not None:
            check_float("entropy_threshold", self.entropy_threshold)
        check_choice("fallback", self.fallback, ("min_entropy", None))
        check_int("max_batch_tokens", self.max_batch_tokens, low=1)
        check_bool("cache", self.cache)
        check_bool("show_progress", self.show_progress)
        if self.prompt is not None:
            from .prompts import PromptTemplate

            if not isinstance(self.prompt, PromptTemplate):
                raise OptionError(f"prompt must be an oprm_rag.PromptTemplate or None, got "
                                  f"{type(self.prompt).__name__}")

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, options: "SelectorOptions | Mapping[str, Any] | None" = None, /,
              **kwargs: Any) -> "SelectorOptions":
        """Options from an existing object or mapping, overridden by keywords.

        An unknown name raises :class:`OptionError` naming the closest option; a
        generation option (``max_new_tokens``...) is sent where it belongs.
        """
        if options is None:
            base: dict[str, Any] = {}
        elif isinstance(options, SelectorOptions):
            base = options.to_dict()
        elif isinstance(options, Mapping):
            base = dict(options)
        else:
            raise OptionError(f"options must be a SelectorOptions or a mapping, got {type(options).__name__}")
        values = {**base, **kwargs}
        _check_names(values)
        return cls(**values)

    def replace(self, **kwargs: Any) -> "SelectorOptions":
        """A checked copy with some values changed."""
        _check_names(kwargs)
        return replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Field values by name (the prompt object itself, not a copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ resolving against a model
    def chunk_size(self, info: "EngineInfo") -> "ChunkSize":
        """The chunk length for the model ``info`` describes (``Engine.describe()``) and why:
        checked against its limits and the overlap."""
        from .engine.types import ChunkSize

        value = self.chunk_tokens
        if value is None:
            return ChunkSize(None, "chunk_tokens=None: each document whole in one state (plain inference)")
        if value == "auto":
            size = info.auto_chunk
            tokens, reason = size.tokens, f"auto: {size.reason}"
        else:
            tokens, reason = int(value), f"chunk_tokens={value} (set explicitly)"
        assert tokens is not None
        limit = info.position_limit
        if limit is not None and tokens >= limit:
            if value == "auto":
                tokens, reason = limit // 2, f"{reason}; halved to fit the model's {limit} positions"
            else:
                raise OptionError(f"chunk_tokens={tokens} does not fit this model's {limit} positions; use a "
                                  f"smaller chunk_tokens (at most {limit // 2} leaves room for the prompt)")
        if self.chunk_overlap >= tokens:
            raise OptionError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than the chunk length "
                              f"({tokens}, {reason})")
        return ChunkSize(tokens, reason)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the integrations see it: name, annotation, default and description."""

    name: str
    annotation: Any
    default: Any
    doc: str


def option_specs() -> list[OptionSpec]:
    """Every option in declaration order (integrations build their fields from this)."""
    from typing import get_type_hints

    from .prompts import PromptTemplate

    hints = get_type_hints(SelectorOptions, {"PromptTemplate": PromptTemplate, **globals()})
    out = []
    for f in fields(SelectorOptions):
        default = f.default if f.default is not MISSING else None
        out.append(OptionSpec(f.name, hints[f.name], default, f.metadata.get("doc", "")))
    return out


def parse_chunk_tokens(value: str) -> ChunkTokens:
    """A ``--chunk-tokens`` string: a number of tokens, ``auto`` or ``none`` (plain inference)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    try:
        n = int(text)
    except ValueError:
        raise OptionError(f"chunk tokens must be a number of tokens, 'auto' or 'none', got {value!r}") from None
    _check_chunk_tokens(n)
    return n


# ---------------------------------------------------------------------- checks
_NAMES = None


def _option_names() -> frozenset[str]:
    global _NAMES
    if _NAMES is None:
        _NAMES = frozenset(f.name for f in fields(SelectorOptions))
    return _NAMES


def check_names(values: Mapping[str, Any], also: Any = ()) -> None:
    """Refuse any name in ``values`` that is not an option (nor in ``also``: a component's
    own fields), naming the closest option; a generation option is sent where it belongs."""
    _check_names(values, frozenset(also))


def _check_names(values: Mapping[str, Any], also: frozenset[str] = frozenset()) -> None:
    names = _option_names() | also
    for key in values:
        if key in names:
            continue
        if key in GENERATION_ALIASES:  # (top_k, a selection option, is among the names above)
            raise OptionError(f"{key!r} is a generation option, not a selection option: pass it to answer(), "
                              "stream() or summarize()")
        near = difflib.get_close_matches(key, sorted(names), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; the options are {sorted(names)}"
        raise OptionError(f"unknown selector option {key!r}{hint}")


def _check_chunk_tokens(value: Any) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"chunk_tokens must be an int, 'auto' or None, got {value!r}")
    if value < MIN_CHUNK_TOKENS:
        raise OptionError(f"chunk_tokens={value} is too small; use at least {MIN_CHUNK_TOKENS} tokens")
