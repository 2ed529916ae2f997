"""``ChatRecurrent``: the shared ``RecurrentLM`` as a LangChain chat model.

Messages become one prompt through the tokenizer's chat template, and the model
decodes from its own fixed-size state, so only the new text comes back. When the
prompt begins with a ``[instruction, chunk, question]`` text the selector just scored,
decoding resumes from that state (``response_metadata["oprm_handoff_hit"]``) instead
of reading the chunk again. Models trained on raw text (``use_chat_template`` off in
their OPRM prompt, like the shipped demo model) get a lone human message as raw text,
so that handoff works for them too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, ClassVar, Iterator, Optional, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, FunctionMessage,
                                     HumanMessage, SystemMessage, ToolMessage)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import run_in_executor
from pydantic import Field

from ._base import RecurrentModelBase
from ._generation import Done, decode, iterate_in_thread

if TYPE_CHECKING:
    from oprm_rag.engine.local import InProcessEngine

__all__ = ["ChatRecurrent", "message_text", "message_role"]

#: Content block types a text-only model cannot take (raised on, never dropped silently).
_MEDIA_BLOCKS = frozenset({"image", "image_url", "audio", "input_audio", "video", "file", "media", "document"})


def message_text(message: BaseMessage) -> str:
    """The text of a message; reasoning and tool-call blocks are left out, media raise."""
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            kind = block.get("type")
            if kind == "text":
                parts.append(str(block.get("text", "")))
            elif kind in _MEDIA_BLOCKS:
                raise ValueError(f"ChatRecurrent takes text only; the message has a {kind!r} block")
    return "".join(parts)


def message_role(message: BaseMessage) -> str:
    """The chat-template role of a LangChain message."""
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(message, ChatMessage):
        return message.role
    raise TypeError(f"unsupported message type {type(message).__name__}")


class ChatRecurrent(RecurrentModelBase, BaseChatModel):
    """A chat model over a recurrent LLM (Mamba, Mamba-2, RWKV, RecurrentGemma...).

    Construction never loads weights: ``model`` is a loaded ``oprm_rag.RecurrentLM``
    or a path, loaded once per process on first use and shared with ``OPRMSelector``
    and ``RecurrentLLM`` on the same path. Greedy unless ``temperature > 0``.

    ``use_chat_template``: True renders every conversation through the tokenizer's chat
    template; False sends the messages' text as raw text; None (default) follows the
    model's OPRM prompt: the chat template for chat models, and for raw-text models a
    single human message passes through as raw text (longer conversations still use
    the template).

    Per call: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``
    (several strings, each may span tokens) and ``model`` (another model path).

    Example:
        .. code-block:: python

            import oprm_rag
            from langchain_oprm import ChatRecurrent

            chat = ChatRecurrent(model=oprm_rag.DEMO_MODEL, max_tokens=16)
            chat.invoke("Hello")
    """

    _ls_model_type: ClassVar[str] = "chat"

    use_chat_template: Optional[bool] = None
    streaming: bool = Field(default=False, description="Decode through _stream even on invoke.")

    @property
    def _llm_type(self) -> str:
        return "oprm-recurrent-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "use_chat_template": self.use_chat_template}

    # ------------------------------------------------------------------ prompts
    def render(self, messages: Sequence[BaseMessage],
               engine: Optional["InProcessEngine"] = None) -> tuple[str, bool]:
        """The prompt text for ``messages`` and whether the tokenizer adds its special tokens."""
        engine = engine or self.get_engine()
        if not messages:
            raise ValueError("no messages were given")
        use_template = self.use_chat_template
        if use_template is None:
            lone_human = len(messages) == 1 and isinstance(messages[0], HumanMessage)
            use_template = bool(engine.prompt.use_chat_template) or not lone_human
        if not use_template:
            return "\n\n".join(message_text(m) for m in messages), True
        turns = [{"role": message_role(m), "content": message_text(m)} for m in messages]
        rendered = engine.apply_chat_template(turns)
        if rendered is not None:
            return str(rendered), False
        # No template: the same transcript RecurrentLM.chat_ids falls back to.
        return "".join(f"{t['role'].capitalize()}: {t['content']}\n" for t in turns) + "Assistant:", True

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Optional[Sequence[Any]] = None) -> int:
        """Tokens of the whole rendered prompt, exactly as the model would read it."""
        if tools:
            raise NotImplementedError("ChatRecurrent does not support tool calling")
        engine = self.get_engine()
        text, special = self.render(messages, engine)
        return len(engine.prompt_ids(text, add_special_tokens=special))

    # ------------------------------------------------------------------ running
    def _pieces(self, messages: list[BaseMessage], stop: Optional[list[str]],
                kwargs: dict[str, Any]) -> Iterator[Any]:
        """Text pieces as decoded, then one ``Done``. Blocking: async callers run it in a thread."""
        engine, config = self._setup(stop, kwargs)  # bad arguments fail before any weights load
        text, special = self.render(messages, engine)
        yield from decode(engine, text, config, add_special_tokens=special)

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        done: Optional[Done] = None
        for item in self._pieces(messages, stop, kwargs):
            if isinstance(item, Done):
                done = item
        assert done is not None
        message = AIMessage(content=done.generation.text, usage_metadata=done.usage(),  # type: ignore[arg-type]
                            response_metadata=done.response_metadata())
        return ChatResult(generations=[ChatGeneration(
            message=message, generation_info={"finish_reason": done.generation.finish_reason})])

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        """Runs the model in a worker thread; the event loop stays free."""
        return await run_in_executor(None, self._generate, messages, stop, None, **kwargs)

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for item in self._pieces(messages, stop, kwargs):
            chunk = self._chunk(item)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        """Decoding runs in a worker thread; pieces come through an asyncio queue."""
        async for item in iterate_in_thread(lambda: self._pieces(messages, stop, kwargs)):
            chunk = self._chunk(item)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _chunk(self, item: Any) -> ChatGenerationChunk:
        if isinstance(item, Done):
            return ChatGenerationChunk(
                message=AIMessageChunk(content="", chunk_position="last",
                                       usage_metadata=item.usage(),  # type: ignore[arg-type]
                                       response_metadata=item.response_metadata()),
                generation_info={"finish_reason": item.generation.finish_reason})
        return ChatGenerationChunk(message=AIMessageChunk(content=item))
