"""``RecurrentLLM``: the shared ``RecurrentLM`` as a LangChain text-completion model.

Prompts are raw text. Several prompts (``generate``/``batch``) are decoded as one
batch: each prompt is prefilled (or resumed from a handed-off state when it begins
with a text the selector just scored), the states are stacked, and all rows decode
together, each stopping on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field, field_validator

from ._generation import Done, decode, iterate_in_thread, make_config, start, usage_metadata
from ._model import ModelLike, check_model, model_name, resolve, validate_model_field

if TYPE_CHECKING:
    from oprm_rag.generation import Generation, GenerationConfig
    from oprm_rag.lm import PromptStart
    from oprm_rag.lm import RecurrentLM

__all__ = ["RecurrentLLM"]


class RecurrentLLM(BaseLLM):
    """A text-completion model over a recurrent LLM; returns only the new text.

    Construction never loads weights: ``model`` is a loaded ``oprm_rag.RecurrentLM``
    or a path, loaded once per process on first use. Per call: ``max_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` and ``model``.

    Example:
        .. code-block:: python

            import oprm_rag
            from langchain_oprm import RecurrentLLM

            llm = RecurrentLLM(model=oprm_rag.DEMO_MODEL, max_tokens=8)
            llm.batch(["The code of alpha is", "The code of beta is"])  # one decoding batch
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

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
    def _llm_type(self) -> str:
        return "oprm-recurrent-llm"

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
            ls_provider="oprm", ls_model_type="llm",
            ls_model_name=model_name(override) if override is not None else self.model_name,
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = [stops] if isinstance(stops, str) else list(stops)
        return params

    def get_lm(self, model: Any = None) -> "RecurrentLM":
        """The shared ``RecurrentLM`` (``model`` overrides this instance's for one call)."""
        return resolve(check_model(model) if model is not None else self.model)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (loads the model on first use)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.get_lm().encode(text)

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    # ------------------------------------------------------------------ running
    def _setup(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> tuple["RecurrentLM", "GenerationConfig"]:
        kwargs = dict(kwargs)
        override = kwargs.pop("model", None)
        defaults = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                    "top_k": self.top_k, "seed": self.seed}
        config = make_config(defaults, stop if stop is not None else self.stop, kwargs)
        return self.get_lm(override), config

    def _generate(self, prompts: list[str], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        lm, config = self._setup(stop, kwargs)
        started = [start(lm, p, add_special_tokens=True) for p in prompts]
        gens = _decode_all(lm, started, config)
        generations = []
        total = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for gen, st in zip(gens, started):
            usage = usage_metadata(gen.prompt_tokens, gen.completion_tokens, st.reused_tokens)
            for key in total:
                total[key] += usage[key]
            generations.append([LCGeneration(text=gen.text, generation_info={
                "finish_reason": gen.finish_reason, "usage": usage, "oprm_handoff_hit": st.handoff_hit})])
        return LLMResult(generations=generations, llm_output={"token_usage": total, "model_name": str(lm.name)})

    async def _agenerate(self, prompts: list[str], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        """Runs the model in a worker thread; the event loop stays free."""
        return await run_in_executor(None, self._generate, prompts, stop, None, **kwargs)

    def _pieces(self, prompt: str, stop: Optional[list[str]], kwargs: dict[str, Any]) -> Iterator[Any]:
        lm, config = self._setup(stop, kwargs)
        yield from decode(lm, prompt, config, add_special_tokens=True)

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        for item in self._pieces(prompt, stop, kwargs):
            chunk = _chunk(item)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        """Decoding runs in a worker thread; pieces come through an asyncio queue."""
        async for item in iterate_in_thread(lambda: self._pieces(prompt, stop, kwargs)):
            chunk = _chunk(item)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _chunk(item: Any) -> GenerationChunk:
    if isinstance(item, Done):
        return GenerationChunk(text="", generation_info={
            **item.response_metadata(), "usage": item.usage()})
    return GenerationChunk(text=item)


def _decode_all(lm: "RecurrentLM", started: list["PromptStart"], config: "GenerationConfig") -> list["Generation"]:
    """One decoding batch for all prompts when states of any length stack (recurrent
    models); the token-replay fallback's states grow with the text, so it goes one by one."""
    if len(started) == 1 or not lm.backend.exact_continuation:
        return [lm.generate_from(s.state, s.logits, config, prompt_tokens=len(s.ids)) for s in started]
    import torch
    from oprm_rag.state import RecurrentState

    state = RecurrentState.cat([s.state for s in started])
    logits = torch.cat([s.logits for s in started], dim=0)
    return lm.generate_batch_from(state, logits, config, prompt_tokens=[len(s.ids) for s in started])
