"""The selector settings of ``OPRMSelector`` and ``OPRMCompressor``, derived from the core.

Every field here is generated from ``oprm_rag.options.option_specs()``: the names,
defaults and descriptions are the core ``SelectorOptions``', and values are checked by
building a core ``SelectorOptions`` (one copy of every check, no torch needed). So a
bad value fails at construction, ``configurable_fields`` can expose any option, and the
LangChain components choose exactly what the CLI, the web app and LlamaIndex choose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oprm_rag.options import SelectorOptions as CoreOptions
from oprm_rag.integration import option_fields
from oprm_rag.options import check_names, option_specs
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, field_validator, model_validator

from ._model import ModelLike, model_name, validate_model_field

if TYPE_CHECKING:
    from oprm_rag.selector import OPRMSelector as EngineSelector

__all__ = ["SelectorFields", "OPTION_NAMES"]

#: The option fields, in the core's order.
OPTION_NAMES: tuple[str, ...] = tuple(spec.name for spec in option_specs())


_Generated: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "_GeneratedSelectorFields",
    __config__=ConfigDict(arbitrary_types_allowed=True, protected_namespaces=()),
    **option_fields(),
)


class SelectorFields(_Generated):  # type: ignore[misc, valid-type]
    """OPRM selection settings (see ``oprm_rag.SelectorOptions``) and the model.

    Unknown keywords are refused: a misspelt option silently ignored would change the
    selection without a word.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, values: Any) -> Any:
        if isinstance(values, dict):
            check_names(values, also=cls.model_fields)
        return values

    model: ModelLike = Field(description="An oprm_rag.RecurrentLM, an oprm_rag Engine (a served model), or a "
                                         "model folder / hub name loaded once per process on first use (never "
                                         "at construction).")
    _options: Any = PrivateAttr(default=None)

    @field_validator("model", mode="before")
    @classmethod
    def _check_model(cls, value: Any) -> Any:
        return validate_model_field(value)

    @model_validator(mode="after")
    def _check_options(self) -> "SelectorFields":
        self._options = CoreOptions.build(**{name: getattr(self, name) for name in OPTION_NAMES})
        return self

    @property
    def model_name(self) -> str:
        """The model's name or path (does not load it)."""
        return model_name(self.model)

    def core_options(self) -> CoreOptions:
        """These settings as the core's ``SelectorOptions``."""
        return self._options

    def core_selector(self) -> "EngineSelector":
        """The core ``OPRMSelector`` for these settings over the shared model (cheap to build:
        the model, its caches and its memos are shared)."""
        from oprm_rag.selector import OPRMSelector as EngineSelector

        return EngineSelector(self.model, self._options)
