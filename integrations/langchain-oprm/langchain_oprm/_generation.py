"""Decoding shared by ``ChatRecurrent`` and ``RecurrentLLM``.

Three things both wrappers need and the engine does not hand out as one call:
turning LangChain's per-call kwargs into a ``GenerationConfig``; starting a prompt
from a handed-off state when the selector just scored its beginning (and saying how
many prompt tokens that saved); and running the blocking decoder in a worker thread
so async callers never block the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    import torch
    from oprm_rag.generation import Generation, GenerationConfig
    from oprm_rag.lm import PromptStart, RecurrentLM
    from oprm_rag.state import RecurrentState

__all__ = ["GENERATION_KWARGS", "make_config", "start", "Done", "decode", "iterate_in_thread",
           "usage_metadata"]

T = TypeVar("T")

#: Per-call keyword arguments the wrappers accept (LangChain names first).
GENERATION_KWARGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def make_config(defaults: dict[str, Any], stop: Sequence[str] | None, kwargs: dict[str, Any]) -> "GenerationConfig":
    """A ``GenerationConfig`` from the instance's fields overridden by per-call kwargs.

    Unknown kwargs raise instead of being dropped: a misspelt option silently ignored
    would change what the model does without telling anyone.
    """
    from oprm_rag.generation import GenerationConfig

    unknown = sorted(set(kwargs) - set(GENERATION_KWARGS))
    if unknown:
        raise TypeError(f"unsupported generation argument(s) {unknown}; supported: {list(GENERATION_KWARGS)}, "
                        "stop, and model (another model path)")
    values = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
    max_tokens = values.get("max_tokens")
    if max_tokens is None:
        raise ValueError("max_tokens must be set")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    return GenerationConfig.make(
        stop=stops or None,
        max_new_tokens=int(max_tokens),
        temperature=float(values.get("temperature") or 0.0),
        top_p=values.get("top_p"),
        top_k=values.get("top_k"),
        seed=values.get("seed"),
    )


def start(lm: "RecurrentLM", prompt: str | Sequence[int], *, add_special_tokens: bool) -> "PromptStart":
    """Run ``prompt``, resuming from the handoff registry when it begins with a scored state
    (``RecurrentLM.start``), so several prompts can be stacked into one batch."""
    return lm.start(prompt, add_special_tokens=add_special_tokens)


@dataclass
class Done:
    """The last item ``decode`` yields: the finished generation and how its prompt started."""

    lm: "RecurrentLM"
    generation: "Generation"
    started: "PromptStart"

    def response_metadata(self) -> dict[str, Any]:
        return {"model_name": str(self.lm.name), "finish_reason": self.generation.finish_reason,
                "oprm_handoff_hit": self.started.handoff_hit}

    def usage(self) -> dict[str, Any]:
        gen = self.generation
        return usage_metadata(gen.prompt_tokens, gen.completion_tokens, self.started.reused_tokens)


def decode(lm: "RecurrentLM", prompt: str | Sequence[int], config: "GenerationConfig", *,
           add_special_tokens: bool) -> Iterator[Any]:
    """Text pieces of one answer as they are decoded, then one ``Done``.

    Blocking (prefill and every decoding step): async callers run it in a worker thread.
    """
    started = start(lm, prompt, add_special_tokens=add_special_tokens)
    stream = lm.stream_from(started.state, started.logits, config, prompt_tokens=len(started.ids))
    stream.handoff_hit = started.handoff_hit
    yield from stream
    yield Done(lm, stream.result, started)


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
