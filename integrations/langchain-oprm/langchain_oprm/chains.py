"""``create_oprm_qa_chain``: selector | prompt | chat model, with the state handoff.

The selector leaves the state after ``[P, C, Q]`` of its best chunk in the model's
handoff registry. The prompt step here writes exactly that text (``P + C + Q`` as
``engine.prompt_text(question, chunk)`` renders it) as the chat model's input, so the
chat model resumes from the stored state instead of reading the chunk again, and
answers exactly as a fresh run over the same tokens would.
"""

from __future__ import annotations

from typing import Any, Optional

from langchain_core.documents import Document
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.runnables import Runnable, RunnableBranch, RunnableLambda, RunnablePassthrough

from oprm_rag.decoding.config import GenerationConfig

from ._documents import context_of
from ._model import ModelLike
from .chat_models import ChatRecurrent
from .selector import OPRMSelector

__all__ = ["create_oprm_qa_chain", "oprm_prompt_messages"]


def oprm_prompt_messages(selector: OPRMSelector, question: str, documents: list[Document]) -> list[BaseMessage]:
    """The chat messages that render to the selector's ``[P, C, Q]`` text for ``documents``.

    The user turn is the core's one rendering (``PromptTemplate.turn``) of the chunks
    joined the core's way; the chat model's own template adds the chat wrapping back,
    which is how the engine cut P and Q out. One document (``top_k=1``, the default)
    reproduces ``prompt_text(question, chunk)`` exactly, so the handoff hits; several
    have no stored state, so the chat model reads them from the start.
    """
    if not documents:
        raise ValueError("no documents were selected")
    template = selector.core_selector().prompt
    messages: list[BaseMessage] = []
    if template.use_chat_template and template.system_prompt:
        messages.append(SystemMessage(template.system_prompt))
    messages.append(HumanMessage(template.turn(context_of(documents), question)))
    return messages


def create_oprm_qa_chain(model: ModelLike, *, max_tokens: int = GenerationConfig.max_new_tokens,
                         temperature: float = 0.0, chat_model: Optional[ChatRecurrent] = None,
                         **selector_kwargs: Any) -> Runnable[dict[str, Any], AIMessage]:
    """A question-answering chain: ``{"question", "documents"}`` in, the answer ``AIMessage`` out.

    ``selector_kwargs`` go to ``OPRMSelector`` (``chunk_tokens``, ``top_k``, ...). The chat
    model defaults to ``ChatRecurrent`` on the same model; it must be on the same
    ``RecurrentLM`` for the handoff to hit. When every chunk answers the IDK word (and no
    ``fallback`` was asked) the chain returns the IDK word without decoding, with
    ``response_metadata["oprm_all_idk"] = True``. The answer's ``response_metadata``
    says whether the handoff hit (``oprm_handoff_hit``); ``usage_metadata`` counts the
    resumed prompt tokens as ``cache_read``.

    Nothing loads until the chain first runs.
    """
    selector = OPRMSelector(model=model, **selector_kwargs)
    chat = chat_model or ChatRecurrent(model=model, max_tokens=max_tokens, temperature=temperature)

    def build_prompt(inputs: dict[str, Any]) -> ChatPromptValue:
        return ChatPromptValue(messages=oprm_prompt_messages(selector, inputs["question"], inputs["context"]))

    def idk_answer(inputs: dict[str, Any]) -> AIMessage:
        return AIMessage(content=selector.core_selector().prompt.idk_word,
                         response_metadata={"model_name": selector.model_name, "oprm_all_idk": True,
                                            "oprm_handoff_hit": False})

    answer = RunnableBranch(
        (lambda inputs: not inputs["context"], RunnableLambda(idk_answer, name="OPRMAllIDK")),
        RunnableLambda(build_prompt, name="OPRMPrompt") | chat,
    )
    chain = RunnablePassthrough.assign(context=selector) | answer
    return chain.with_config(run_name="OPRMQAChain")
