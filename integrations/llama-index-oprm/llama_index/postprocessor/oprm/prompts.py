"""A LlamaIndex QA prompt that renders exactly the OPRM ``[P, C, Q]`` input.

Two reasons to answer with the prompt OPRM scored with rather than LlamaIndex's default
QA template: models trained on that format (the shipped demo model) answer far better
with it, and when the rendered prompt begins with exactly the text a chunk was scored
with, ``RecurrentLLM`` resumes from the stored state instead of prefilling the chunk
again (the handoff).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, List, Optional

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import BasePromptTemplate, ChatPromptTemplate, PromptTemplate, PromptType

if TYPE_CHECKING:  # pragma: no cover
    from oprm_rag.lm import RecurrentLM

__all__ = ["oprm_qa_prompt"]

_QUESTION_MARK = "\u2063OPRM_QUERY\u2063"


def oprm_qa_prompt(lm: "RecurrentLM", idk_word: Optional[str] = None) -> BasePromptTemplate:
    """The model's OPRM prompt with ``{context_str}`` for the chunk and ``{query_str}`` for Q.

    For raw-text models this is a ``PromptTemplate`` rendering ``P + context + Q``; for
    models whose OPRM prompt goes through the chat template it is a ``ChatPromptTemplate``
    whose user turn, rendered by ``RecurrentLLM.chat``, gives the same text. LlamaIndex
    fills variables with a safe formatter, so braces in P or Q need no escaping.
    """
    template = lm.prompt if idk_word is None else lm.prompt.with_idk_word(idk_word)
    before, after = dataclasses.replace(template, use_chat_template=False).split(_QUESTION_MARK)
    if after.count(_QUESTION_MARK) != 1:
        raise ValueError("the model's question template must contain {question} exactly once")
    turn = before + "{context_str}" + after.replace(_QUESTION_MARK, "{query_str}")
    if not template.use_chat_template:
        return PromptTemplate(turn, prompt_type=PromptType.QUESTION_ANSWER)
    messages: List[ChatMessage] = []
    if template.system_prompt:
        messages.append(ChatMessage(role=MessageRole.SYSTEM, content=template.system_prompt))
    messages.append(ChatMessage(role=MessageRole.USER, content=turn))
    return ChatPromptTemplate(message_templates=messages, prompt_type=PromptType.QUESTION_ANSWER)
