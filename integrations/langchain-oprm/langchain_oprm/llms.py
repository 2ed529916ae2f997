"""``RecurrentLLM``: the shared ``RecurrentLM`` as a LangChain text-completion model.

Prompts are raw text. Several prompts (``generate``/``batch``) are decoded as one
batch: each prompt is prefilled (or resumed from a handed-off state when it begins
with a text the selector just scored), the states are stacked, and all rows decode
together, each stopping on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, ClassVar, Iterator, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult
from langchain_core.runnables.config import run_in_executor

from ._base import RecurrentModelBase
from ._generation import Done, decode, iterate_in_thread, usage_metadata

if TYPE_CHECKING:
    from oprm_rag.engine.local import InProcessEngine, PromptStart
    from oprm_rag.decoding.config import Generation, GenerationConfig

__all__ = ["RecurrentLLM"]


class RecurrentLLM(RecurrentModelBase, BaseLLM):
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

    _ls_model_type: ClassVar[str] = "llm"

    @property
    def _llm_type(self) -> str:
        return "oprm-recurrent-llm"

    # ------------------------------------------------------------------ running
    def _generate(self, prompts: list[str], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        engine, config = self._setup(stop, kwargs)
        started = [engine.start_prompt(p, add_special_tokens=True) for p in prompts]
        gens = _decode_all(engine, started, config)
        generations = []
        total = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for gen, st in zip(gens, started):
            usage = usage_metadata(gen.prompt_tokens, gen.completion_tokens, st.reused_tokens)
            for key in total:
                total[key] += usage[key]
            generations.append([LCGeneration(text=gen.text, generation_info={
                "finish_reason": gen.finish_reason, "usage": usage, "oprm_handoff_hit": st.handoff_hit})])
        return LLMResult(generations=generations, llm_output={"token_usage": total, "model_name": str(engine.name)})

    async def _agenerate(self, prompts: list[str], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        """Runs the model in a worker thread; the event loop stays free."""
        return await run_in_executor(None, self._generate, prompts, stop, None, **kwargs)

    def _pieces(self, prompt: str, stop: Optional[list[str]], kwargs: dict[str, Any]) -> Iterator[Any]:
        engine, config = self._setup(stop, kwargs)
        yield from decode(engine, prompt, config, add_special_tokens=True)

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


def _decode_all(engine: "InProcessEngine", started: list["PromptStart"],
                config: "GenerationConfig") -> list["Generation"]:
    """One decoding batch for all prompts when states of any length stack (exact states);
    the token-replay fallback's states grow with the text, so it goes one by one."""
    from oprm_rag.engine import StatefulEngine

    ctx = engine
    if len(started) == 1 or not isinstance(ctx, StatefulEngine):
        return [ctx.generate_batch(s.state, [s.logits[0]], config, [len(s.ids)])[0] for s in started]
    return ctx.generate_batch(ctx.cat_states([s.state for s in started]), [s.logits[0] for s in started], config,
                              [len(s.ids) for s in started])
