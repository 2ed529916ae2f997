"""The settings and plumbing ``ChatRecurrent`` and ``RecurrentLLM`` share.

Both wrap the same shared ``RecurrentLM`` and take the same generation options, so
their fields, the ``model`` check, the names they report to LangChain (tracing,
LangSmith) and the per-call set-up live here once: a chat model and a text model built
with the same settings then decode with the same configuration and report themselves
the same way. It is a pydantic model listed before the LangChain base class
(``class ChatRecurrent(RecurrentModelBase, BaseChatModel)``), so its fields join the
LangChain model's fields and its methods override ``BaseLanguageModel``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

from langchain_core.language_models import LangSmithParams
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._model import ModelLike, check_model, in_process, model_name, validate_model_field

if TYPE_CHECKING:
    from oprm_rag.decoding.config import GenerationConfig
    from oprm_rag.engine.local import InProcessEngine
    from oprm_rag.lm import RecurrentLM

__all__ = ["RecurrentModelBase"]


class RecurrentModelBase(BaseModel):
    """Generation fields and model handling of the LangChain model wrappers.

    Subclasses set ``_ls_model_type`` (``"chat"`` or ``"llm"``): the one thing LangSmith
    needs to tell them apart.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    _ls_model_type: ClassVar[str]

    model: ModelLike = Field(description="An oprm_rag.RecurrentLM, or a model folder / hub name.")
    max_tokens: int = Field(default=256, ge=0, description="Most new tokens per answer.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = Field(default=None, description="Seed for sampling (temperature > 0).")
    stop: Optional[list[str]] = Field(default=None, description="Stop strings (not included in the output).")

    @field_validator("model", mode="before")
    @classmethod
    def _check_model(cls, value: Any) -> Any:
        return validate_model_field(value)

    @property
    def model_name(self) -> str:
        """The model's name or path (does not load it)."""
        return model_name(self.model)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        override = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="oprm", ls_model_type=self._ls_model_type,  # type: ignore[typeddict-item]
            ls_model_name=model_name(override) if override is not None else self.model_name,
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = [stops] if isinstance(stops, str) else list(stops)
        return params

    def get_engine(self, model: Any = None) -> "InProcessEngine":
        """The shared model's in-process engine (``model`` overrides this instance's for one call)."""
        return in_process(check_model(model) if model is not None else self.model)

    def get_lm(self, model: Any = None) -> "RecurrentLM":
        """The shared ``RecurrentLM`` (``model`` overrides this instance's for one call)."""
        return self.get_engine(model).lm

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (loads the model on first use)."""
        custom = getattr(self, "custom_get_token_ids", None)  # a BaseLanguageModel field
        if custom is not None:
            return custom(text)
        return self.get_engine().encode(text)

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    def _setup(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> tuple["InProcessEngine", "GenerationConfig"]:
        """The model's engine and decoding configuration of one call: per-call kwargs (and a per-call
        ``model``) override the fields. The configuration is made first, so bad arguments
        fail before any weights load."""
        from oprm_rag.decoding.config import GenerationConfig

        kwargs = dict(kwargs)
        override = kwargs.pop("model", None)
        defaults = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                    "top_k": self.top_k, "seed": self.seed}
        config = GenerationConfig.from_call(defaults, kwargs, stop if stop is not None else self.stop)
        return self.get_engine(override), config
