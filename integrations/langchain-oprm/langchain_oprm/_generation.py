"""Decoding shared by ``ChatRecurrent`` and ``RecurrentLLM``: LangChain shapes only.

The core does the work: ``GenerationConfig.from_call`` maps LangChain's per-call
arguments, ``InProcessEngine.start_prompt`` resumes from a handed-off state when the
selector just scored the prompt's beginning, and ``TokenStream`` decodes. What is left
here is LangChain's usage shape and the worker-thread bridge for async callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    from oprm_rag.decoding.config import Generation, GenerationConfig
    from oprm_rag.engine.local import InProcessEngine, PromptStart

__all__ = ["Done", "decode", "iterate_in_thread", "usage_metadata"]

T = TypeVar("T")


@dataclass
class Done:
    """The last item ``decode`` yields: the finished generation and how its prompt started."""

    engine: "InProcessEngine"
    generation: "Generation"
    started: "PromptStart"

    def response_metadata(self) -> dict[str, Any]:
        return {"model_name": str(self.engine.name), "finish_reason": self.generation.finish_reason,
                "oprm_handoff_hit": self.started.handoff_hit}

    def usage(self) -> dict[str, Any]:
        gen = self.generation
        return usage_metadata(gen.prompt_tokens, gen.completion_tokens, self.started.reused_tokens)


def decode(engine: "InProcessEngine", prompt: str | Sequence[int], config: "GenerationConfig", *,
           add_special_tokens: bool) -> Iterator[Any]:
    """Text pieces of one answer as they are decoded, then one ``Done``.

    Blocking (prefill and every decoding step): async callers run it in a worker thread.
    """
    from oprm_rag.decoding.loop import TokenStream

    started = engine.start_prompt(prompt, add_special_tokens=add_special_tokens)
    stream = TokenStream(engine.lm, started.state, started.logits, config, prompt_tokens=len(started.ids),
                         reused_tokens=started.reused_tokens)
    yield from stream
    yield Done(engine, stream.result, started)


def usage_metadata(prompt_tokens: int, output_tokens: int, reused_tokens: int) -> dict[str, Any]:
    """LangChain ``UsageMetadata``; tokens resumed from a handed-off state count as a cache read."""
    usage: dict[str, Any] = {"input_tokens": prompt_tokens, "output_tokens": output_tokens,
                             "total_tokens": prompt_tokens + output_tokens}
    if reused_tokens:
        usage["input_token_details"] = {"cache_read": reused_tokens}
    return usage


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """The engine's worker-thread bridge (``oprm_rag.aio.aiter_in_thread``)."""
    from oprm_rag.aio import aiter_in_thread

    async for item in aiter_in_thread(make):
        yield item
