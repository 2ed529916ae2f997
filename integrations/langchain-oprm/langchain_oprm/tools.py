"""``oprm_tool``: let an agent look up a passage of a long document by asking a question.

The agent names a document and asks; the recurrent model scores every chunk of that
document and the tool returns the chunk(s) it can answer from. The tool message's
content is the selected text; its artifact is the selected ``Document`` objects with
their scores, for code that wants more than text.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from langchain_core.callbacks import Callbacks
from oprm_rag.errors import InputError
from langchain_core.documents import Document
from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field, create_model

from ._documents import context_of, parse_documents
from ._model import ModelLike
from .selector import OPRMSelector

__all__ = ["oprm_tool", "ToolDocuments"]

#: One document's text, a ``Document``, or several ``Document`` objects under one id.
ToolDocuments = Mapping[str, Union[str, Document, list[Document]]]

_DEFAULT_DESCRIPTION = (
    "Find the passage of a long document that answers a question. The document is read by a "
    "recurrent language model that scores every chunk for the question and returns the chunk it "
    "can answer from; it answers nothing when no chunk contains the answer. Ask one specific, "
    "self-contained question per call. Documents: {ids}."
)


def _known(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids)


def oprm_tool(model_or_selector: Union[OPRMSelector, ModelLike], documents: ToolDocuments, *,
              name: str = "oprm_search", description: Optional[str] = None, handle_errors: bool = True,
              **selector_kwargs: Any) -> StructuredTool:
    """A ``StructuredTool`` (args ``question``, ``document_id``) over named documents.

    ``model_or_selector`` is an ``OPRMSelector`` (its settings are used) or a model /
    path, with ``selector_kwargs`` (``chunk_tokens``, ``top_k``...) for a new selector.
    ``response_format="content_and_artifact"``: content is the selected text (chunks in
    document order, separated by a blank line), the artifact the selected ``Document``
    objects, best first, with ``document_id`` in their metadata. An unknown document id
    or an empty question is reported to the agent as the tool's answer (listing the
    known ids) when ``handle_errors`` is True, else raised as ``ToolException``.
    Nothing is loaded until the first call.
    """
    if isinstance(model_or_selector, OPRMSelector):
        if selector_kwargs:
            raise TypeError("pass selector settings either on the OPRMSelector or as keyword arguments, not both")
        selector = model_or_selector
    else:
        selector = OPRMSelector(model=model_or_selector, **selector_kwargs)
    corpus = _corpus(documents)
    ids = list(corpus)

    def request(question: str, document_id: str) -> dict[str, Any]:
        if document_id not in corpus:
            raise ToolException(f"Unknown document_id {document_id!r}. Known document ids: {_known(ids)}.")
        if not isinstance(question, str) or not question.strip():
            raise ToolException("The question is empty; ask a specific question about the document.")
        return {"question": question, "documents": corpus[document_id]}

    def respond(document_id: str, selected: list[Document]) -> tuple[str, list[Document]]:
        if not selected:
            idk = selector.core_selector().prompt.idk_word
            return (f"No passage of document {document_id!r} answers this question "
                    f"(the model answered {idk!r} for every chunk)."), []
        return context_of(selected), selected

    def run(question: str, document_id: str, callbacks: Callbacks = None) -> tuple[str, list[Document]]:
        try:
            docs = selector.invoke(request(question, document_id), config={"callbacks": callbacks})
        except InputError as exc:  # the agent's mistake (e.g. a question longer than a chunk): it can fix it
            raise ToolException(str(exc)) from exc
        return respond(document_id, docs)

    async def arun(question: str, document_id: str, callbacks: Callbacks = None) -> tuple[str, list[Document]]:
        try:
            docs = await selector.ainvoke(request(question, document_id), config={"callbacks": callbacks})
        except InputError as exc:
            raise ToolException(str(exc)) from exc
        return respond(document_id, docs)

    args_schema: type[BaseModel] = create_model(
        "OPRMToolInput",
        question=(str, Field(description="A specific, self-contained question to answer from the document.")),
        document_id=(str, Field(description=f"Which document to read; one of: {_known(ids)}.")),
    )
    return StructuredTool.from_function(
        func=run, coroutine=arun, name=name, args_schema=args_schema,
        description=description or _DEFAULT_DESCRIPTION.format(ids=_known(ids)),
        response_format="content_and_artifact", handle_tool_error=handle_errors,
    )


def _corpus(documents: ToolDocuments) -> dict[str, list[Document]]:
    """Named documents as lists of ``Document`` tagged with their id (checked now, not at call time)."""
    if not isinstance(documents, Mapping) or not documents:
        raise ValueError("documents must be a non-empty dict of document id -> text, Document or list of Documents")
    corpus: dict[str, list[Document]] = {}
    for doc_id, value in documents.items():
        if not isinstance(doc_id, str) or not doc_id:
            raise TypeError(f"document ids must be non-empty strings, got {doc_id!r}")
        docs = parse_documents(value)
        if not any(d.page_content.strip() for d in docs):
            raise ValueError(f"document {doc_id!r} has no text")
        corpus[doc_id] = [Document(page_content=d.page_content, id=d.id,
                                   metadata={"document_id": doc_id, **d.metadata}) for d in docs]
    return corpus
