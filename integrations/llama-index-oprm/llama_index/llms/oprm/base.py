"""``RecurrentLLM``: a LlamaIndex ``CustomLLM`` over the shared ``oprm_rag.RecurrentLM``.

It adds no decoding of its own: every call goes to ``RecurrentLM.complete``, which streams
text deltas from the engine's decoder (multi-token stop strings, incremental UTF-8) and
resumes from a state the OPRM selector has just scored when the prompt begins with
exactly that ``[P, C, Q]`` text, so an answer after ``OPRMNodePostprocessor`` need not
prefill the winning chunk again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Dict, Generator, List, Optional, Sequence

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from oprm_rag.decoding.config import GenerationConfig

from .utils import LazyModel, aiter_in_thread

if TYPE_CHECKING:  # pragma: no cover
    from oprm_rag.decoding.loop import TokenStream
    from oprm_rag.lm import RecurrentLM

__all__ = ["RecurrentLLM"]

logger = logging.getLogger(__name__)


class RecurrentLLM(LazyModel, CustomLLM):
    """A recurrent LLM (Mamba, Mamba-2, RWKV, RecurrentGemma, ...) for LlamaIndex.

    ``model`` is a loaded ``RecurrentLM`` or a model folder / hub name; a path is loaded
    once per process on first use (``oprm_rag.resolve``), never here, so
    building this class is free. Decoding is greedy unless ``temperature > 0``.

    ``chat`` renders messages with the tokenizer's chat template. ``metadata.is_chat_model``
    follows the model's OPRM prompt (``lm.prompt.use_chat_template``) unless set: the
    shipped demo model was trained on raw-text prompts, so LlamaIndex sends it text.
    ``metadata.context_window`` is the model's hard limit (``RecurrentLM.context_window``),
    not its training length; pass ``context_window=`` to report something else.
    """

    max_new_tokens: int = Field(default=GenerationConfig.max_new_tokens, ge=0,
                                description="Tokens to generate at most per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    top_k: Optional[int] = Field(default=None, ge=1, description="Sample from the k most likely tokens.")
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: Optional[int] = Field(default=None, description="Seed for sampling (reproducible answers).")
    stop: List[str] = Field(default_factory=list, description="Stop strings (any length, any token split).")
    is_chat: Optional[bool] = Field(
        default=None, description="Report a chat model to LlamaIndex; None = the model's OPRM prompt says.")
    add_special_tokens: Optional[bool] = Field(
        default=None, description="Add the tokenizer's special tokens to completion prompts; None = add them "
                                  "unless the model's prompts come from its chat template (which has its own).")
    context_window: Optional[int] = Field(
        default=None, ge=1, description="What to report to LlamaIndex; None = the model's hard limit "
                                        "(``RecurrentLM.context_window``).")
    model_kwargs: Dict[str, Any] = Field(
        default_factory=dict, description="Options for loading a path (device, dtype, kernels, ...).")

    def __init__(self, model: Any = None, **kwargs: Any) -> None:
        from oprm_rag.engine import Engine
        from oprm_rag.engine.local import InProcessEngine

        if isinstance(model, Engine) and not isinstance(model, InProcessEngine):
            raise TypeError(f"RecurrentLLM decodes in this process; {model.name} is a served model: use "
                            "LlamaIndex's OpenAILike(api_base=..., model=...) on the same server")
        super().__init__(**({} if model is None else {"model": model}), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "RecurrentLLM"

    # ------------------------------------------------------------------ model
    @property
    def metadata(self) -> LLMMetadata:
        lm = self.lm
        return LLMMetadata(
            context_window=int(self.context_window or lm.context_window),
            num_output=int(self.max_new_tokens),
            is_chat_model=self._is_chat_model(lm),
            is_function_calling_model=False,
            model_name=str(lm.name),
        )

    def _is_chat_model(self, lm: "RecurrentLM") -> bool:
        return bool(lm.prompt.use_chat_template) if self.is_chat is None else bool(self.is_chat)

    def _special_tokens(self, lm: "RecurrentLM") -> bool:
        if self.add_special_tokens is not None:
            return bool(self.add_special_tokens)
        return not lm.prompt.use_chat_template

    def _config(self, overrides: Dict[str, Any]) -> Any:
        """Fields overridden by one call's arguments; call ``stop`` strings add to the field's."""
        overrides = dict(overrides)
        extra = overrides.pop("stop", None)
        stop = list(self.stop) + ([extra] if isinstance(extra, str) else list(extra or ()))
        defaults = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                    "top_p": self.top_p, "seed": self.seed}
        return GenerationConfig.from_call(defaults, overrides, stop)

    # ------------------------------------------------------------------ running (blocking)
    def _start_completion(self, prompt: str, formatted: bool, overrides: Dict[str, Any]) -> "TokenStream":
        engine = self.local
        if not formatted and self.completion_to_prompt is not None:
            prompt = self.completion_to_prompt(prompt)
        return engine.complete(prompt, self._config(overrides), add_special_tokens=self._special_tokens(engine.lm))

    def _start_chat(self, messages: Sequence[ChatMessage], overrides: Dict[str, Any]) -> "TokenStream":
        engine = self.local
        turns = [{"role": _role(m), "content": m.content or ""} for m in messages]
        # Render to text, not ids: a rendered turn that begins with a just-scored
        # [P, C, Q] text finds its state through the handoff's text match.
        text = engine.apply_chat_template(turns)
        if text is not None:
            return engine.complete(text, self._config(overrides), add_special_tokens=False)
        return engine.complete(engine.lm.chat_ids(turns), self._config(overrides))

    @staticmethod
    def _raw(stream: "TokenStream") -> Dict[str, Any]:
        """OpenAI-style usage (what LlamaIndex's token counter reads) and engine facts."""
        gen = stream.result
        return {
            "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                      "total_tokens": gen.prompt_tokens + gen.completion_tokens},
            "finish_reason": gen.finish_reason,
            "handoff_hit": bool(stream.handoff_hit),
            "model": str(stream.lm.name),
        }

    def _completion(self, prompt: str, formatted: bool, overrides: Dict[str, Any]) -> CompletionResponse:
        stream = self._start_completion(prompt, formatted, overrides)
        text = stream.text()
        return CompletionResponse(text=text, raw=self._raw(stream))

    def _completion_chunks(self, prompt: str, formatted: bool,
                           overrides: Dict[str, Any]) -> Generator[CompletionResponse, None, None]:
        stream = self._start_completion(prompt, formatted, overrides)
        text = ""
        for piece in stream:
            text += piece
            yield CompletionResponse(text=text, delta=piece)
        # Usage is known only once decoding ends: a last, empty delta carries it.
        yield CompletionResponse(text=text, delta="", raw=self._raw(stream))

    def _chat(self, messages: Sequence[ChatMessage], overrides: Dict[str, Any]) -> ChatResponse:
        stream = self._start_chat(messages, overrides)
        text = stream.text()
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=self._raw(stream))

    def _chat_chunks(self, messages: Sequence[ChatMessage],
                     overrides: Dict[str, Any]) -> Generator[ChatResponse, None, None]:
        stream = self._start_chat(messages, overrides)
        text = ""
        for piece in stream:
            text += piece
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
        yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="",
                           raw=self._raw(stream))

    # ------------------------------------------------------------------ LlamaIndex API (sync)
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._completion(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completion_chunks(prompt, formatted, kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_chunks(messages, kwargs)

    # ------------------------------------------------------------------ LlamaIndex API (async)
    # The model call blocks for its whole duration, so it runs in a worker thread;
    # streams come back through an asyncio queue (``aiter_in_thread``).
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._completion, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return aiter_in_thread(lambda: self._completion_chunks(prompt, formatted, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return aiter_in_thread(lambda: self._chat_chunks(messages, kwargs))


def _role(message: ChatMessage) -> str:
    role = message.role
    return role.value if isinstance(role, MessageRole) else str(role)
