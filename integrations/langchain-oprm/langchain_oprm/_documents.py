"""LangChain ``Document`` in, selected chunk ``Document`` out.

The engine works on plain texts; here the source documents' metadata is carried over
to the chunks chosen from them, with where each chunk came from and how the model
scored it. Only plain numbers go into metadata: model state stays in the model's
handoff registry, where the chat model finds it by the prompt's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from langchain_core.documents import Document

if TYPE_CHECKING:
    from oprm_rag.selector import SelectionResult

__all__ = ["DocumentsInput", "Request", "parse_documents", "make_request", "parse_request", "selected_documents",
           "query_of", "context_of"]

DocumentsInput = Union[str, Document, Sequence[Union[str, Document]]]


@dataclass
class Request:
    """One question over its source documents; ``texts[j]`` is ``sources[source_of[j]]``."""

    question: str
    sources: list[Document]
    texts: list[str]
    source_of: list[int]


def parse_documents(documents: Any) -> list[Document]:
    """Strings and ``Document`` objects (one or a list) as a list of ``Document``."""
    if isinstance(documents, (str, Document)):
        documents = [documents]
    if documents is None or isinstance(documents, Mapping) or not isinstance(documents, Sequence):
        raise TypeError("documents must be a string, a Document, or a list of them, "
                        f"got {type(documents).__name__}")
    out = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            out.append(Document(page_content=doc))
        elif isinstance(doc, Document):
            out.append(doc)
        else:
            raise TypeError(f"document {i} is {type(doc).__name__}; pass a str or a langchain Document")
    return out


def make_request(question: Any, documents: Any) -> Request:
    """Check a question and its documents; blank documents are skipped (a retriever may
    return some), but at least one must have text."""
    if not isinstance(question, str):
        raise TypeError(f"the question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("the question is empty")
    sources = parse_documents(documents)
    keep = [i for i, d in enumerate(sources) if d.page_content.strip()]
    if not keep:
        raise ValueError("no document has any text: pass at least one non-empty document")
    return Request(question, sources, [sources[i].page_content for i in keep], keep)


def parse_request(value: Any) -> Request:
    """A runnable input ``{"question": str, "documents": ...}`` as a ``Request``."""
    if not isinstance(value, Mapping):
        raise TypeError('OPRMSelector takes {"question": str, "documents": list[Document] | str}, '
                        f"got {type(value).__name__}")
    missing = [k for k in ("question", "documents") if k not in value]
    if missing:
        raise KeyError(f"OPRMSelector input lacks {missing}; it needs 'question' and 'documents'")
    return make_request(value["question"], value["documents"])


def query_of(value: Any) -> str:
    """The text to show as a retriever run's query, whatever the input looks like."""
    if isinstance(value, Mapping) and isinstance(value.get("question"), str):
        return value["question"]
    return str(value)


def selected_documents(request: Request, result: "SelectionResult") -> list[Document]:
    """The chosen chunks, best first, as ``Document`` objects: the source's metadata plus
    the core's ``ChunkScore.metadata()`` (``oprm_*`` keys) and LangChain's
    ``relevance_score`` (higher is better). ``oprm_doc_index`` is the source's position
    in the list the caller passed."""
    out = []
    for score in result.selected:
        index = request.source_of[score.doc_index]
        metadata: dict[str, Any] = {**request.sources[index].metadata, **score.metadata(result.usage),
                                    "oprm_doc_index": index, "relevance_score": float(score.relevance_score)}
        out.append(Document(page_content=score.text, metadata=metadata))
    return out


def context_of(documents: Sequence[Document]) -> str:
    """Selected chunks' text joined the core's way (document order; adjacent chunks run on)."""
    from types import SimpleNamespace

    from oprm_rag.results import join_chunk_texts

    parts = [SimpleNamespace(doc_index=d.metadata.get("oprm_doc_index", 0), char_start=d.metadata.get(
        "oprm_char_start", 0), char_end=d.metadata.get("oprm_char_end", 0), text=d.page_content) for d in documents]
    return join_chunk_texts(parts)
