"""A LlamaIndex QA prompt that renders exactly the OPRM ``[P, C, Q]`` input.

Two reasons to answer with the prompt OPRM scored with rather than LlamaIndex's default
QA template: models trained on that format (the shipped demo model) answer far better
with it, and when the rendered prompt begins with exactly the text a chunk was scored
with, ``RecurrentLLM`` resumes from the stored state instead of prefilling the chunk
again (the handoff).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import BasePromptTemplate, ChatPromptTemplate, PromptTemplate, PromptType

if TYPE_CHECKING:  # pragma: no cover
    from oprm_rag.prompts import PromptTemplate as OPRMPromptTemplate

__all__ = ["oprm_qa_prompt"]


def oprm_qa_prompt(template: "OPRMPromptTemplate") -> BasePromptTemplate:
    """An OPRM prompt with ``{context_str}`` for the chunk and ``{query_str}`` for Q.

    The user turn is the core's one rendering (``PromptTemplate.turn``). For raw-text
    models this is a ``PromptTemplate`` rendering ``P + context + Q``; for models whose
    OPRM prompt goes through the chat template it is a ``ChatPromptTemplate`` whose user
    turn, rendered by ``RecurrentLLM.chat``, gives the same text. LlamaIndex fills
    variables with a safe formatter, so braces in P or Q need no escaping. Get it from a
    component as ``OPRMNodePostprocessor.qa_prompt()`` (its selector's prompt, IDK word
    included).
    """
    turn = template.turn("{context_str}", "{query_str}")
    if not template.use_chat_template:
        return PromptTemplate(turn, prompt_type=PromptType.QUESTION_ANSWER)
    messages: List[ChatMessage] = []
    if template.system_prompt:
        messages.append(ChatMessage(role=MessageRole.SYSTEM, content=template.system_prompt))
    messages.append(ChatMessage(role=MessageRole.USER, content=turn))
    return ChatPromptTemplate(message_templates=messages, prompt_type=PromptType.QUESTION_ANSWER)
