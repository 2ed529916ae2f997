"""The selector options shared by ``OPRMSelector`` and ``OPRMCompressor``.

They are plain pydantic fields, checked when the component is built (no weights are
needed for that), so ``configurable_fields`` can expose any of them and a bad value
fails at construction rather than at the first question.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._model import ModelLike, engine_selector, model_name, resolve, validate_model_field

if TYPE_CHECKING:
    from oprm_rag.lm import RecurrentLM
    from oprm_rag.selector import OPRMSelector as EngineSelector

__all__ = ["SelectorOptions"]

#: Fields passed through to the engine's ``OPRMSelector`` unchanged.
ENGINE_FIELDS = ("chunk_tokens", "chunk_overlap", "boundary", "boundary_tolerance", "top_k", "entropy_threshold",
                 "criterion", "idk_filter", "idk_word", "fallback", "max_batch_tokens", "cache")


class SelectorOptions(BaseModel):
    """OPRM selection settings (see ``oprm_rag.OPRMSelector`` for the algorithm)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: ModelLike = Field(description="An oprm_rag.RecurrentLM, or a model folder / hub name loaded once "
                                         "per process on first use (never at construction).")
    chunk_tokens: Union[int, Literal["auto"], None] = Field(
        default=2000, description="Chunk length in model tokens; None keeps documents whole; 'auto' sizes "
                                  "chunks from the model's state capacity.")
    chunk_overlap: int = Field(default=0, ge=0, description="Tokens repeated from the previous chunk.")
    boundary: Literal["paragraph", "sentence"] | None = Field(
        default=None, description="Prefer ending chunks at a paragraph or sentence end.")
    boundary_tolerance: float = Field(default=0.15, ge=0.0, le=1.0,
                                      description="Share of a chunk within which a boundary may end it.")
    top_k: int = Field(default=1, ge=1, description="How many chunks to select, best first.")
    entropy_threshold: float | None = Field(default=None, description="Also drop chunks above this entropy.")
    criterion: Literal["entropy", "question_likelihood"] = Field(
        default="entropy", description="Lowest first-token entropy wins, or highest log p(question | chunk).")
    idk_filter: bool = Field(default=True, description="Drop chunks whose first answer token starts the IDK word.")
    idk_word: str | None = Field(default=None, description="The IDK word (default: the model prompt's).")
    fallback: Literal["min_entropy"] | None = Field(
        default=None, description="'min_entropy' keeps the lowest-entropy chunk when every chunk says IDK.")
    max_batch_tokens: int = Field(default=16384, ge=1, description="Rows x tokens per model call.")
    cache: bool = Field(default=True, description="Use the model's shared document state cache.")

    @field_validator("model", mode="before")
    @classmethod
    def _check_model(cls, value: Any) -> Any:
        return validate_model_field(value)

    @field_validator("chunk_tokens", mode="before")
    @classmethod
    def _check_chunk_tokens(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("chunk_tokens must be an int, None or 'auto', not a bool")
        if isinstance(value, int) and value < 8:
            raise ValueError(f"chunk_tokens={value} is too small; use at least 8 tokens")
        return value

    @model_validator(mode="after")
    def _check_overlap(self) -> "SelectorOptions":
        if isinstance(self.chunk_tokens, int) and self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        return self

    @property
    def model_name(self) -> str:
        """The model's name or path (does not load it)."""
        return model_name(self.model)

    def engine_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ENGINE_FIELDS}

    def get_lm(self) -> "RecurrentLM":
        """The shared ``RecurrentLM`` (loaded on the first call for a path)."""
        return resolve(self.model)

    def engine(self) -> "EngineSelector":
        """The engine ``OPRMSelector`` for these settings, shared with every component
        that has the same model and settings."""
        return engine_selector(self.get_lm(), self.engine_options())
