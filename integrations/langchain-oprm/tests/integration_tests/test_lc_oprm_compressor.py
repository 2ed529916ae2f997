"""OPRMCompressor: the selector behind a retriever (compress_documents, async, callbacks)."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from lc_oprm_support import DOC, OTHER_DOC, QUESTION, same_documents

from langchain_oprm import OPRMCompressor, OPRMSelector

SETTINGS: dict[str, Any] = {"chunk_tokens": 24, "idk_filter": False, "top_k": 2}
RETRIEVED = [Document(page_content=DOC, metadata={"source": "manual.txt"}),
             Document(page_content="", metadata={"source": "empty.txt"}),
             Document(page_content=OTHER_DOC, metadata={"source": "notes.txt"})]


class Queries(BaseCallbackHandler):
    def __init__(self) -> None:
        self.queries: list[str] = []
        self.outputs: list[list[Document]] = []

    def on_retriever_start(self, serialized: Any, query: str, **kwargs: Any) -> None:
        self.queries.append(query)

    def on_retriever_end(self, documents: Any, **kwargs: Any) -> None:
        self.outputs.append(list(documents))


def test_compress_keeps_the_selected_chunks(primary_path: str) -> None:
    compressor = OPRMCompressor(model=primary_path, **SETTINGS)
    handler = Queries()
    out = list(compressor.compress_documents(RETRIEVED, QUESTION, callbacks=[handler]))
    expected = OPRMSelector(model=primary_path, **SETTINGS).invoke({"question": QUESTION, "documents": RETRIEVED})
    assert same_documents(out, expected) and len(out) == 2
    for doc in out:
        source = RETRIEVED[doc.metadata["oprm_doc_index"]]
        assert doc.metadata["source"] == source.metadata["source"]
        assert doc.page_content == source.page_content[doc.metadata["oprm_char_start"]:doc.metadata["oprm_char_end"]]
    assert handler.queries == [QUESTION] and same_documents(handler.outputs[0], out)


async def test_acompress_matches_compress(primary_path: str) -> None:
    compressor = OPRMCompressor(model=primary_path, **SETTINGS)
    handler = Queries()
    out = list(await compressor.acompress_documents(RETRIEVED, QUESTION, callbacks=[handler]))
    assert same_documents(out, list(compressor.compress_documents(RETRIEVED, QUESTION)))
    assert handler.queries == [QUESTION]


async def test_nothing_to_compress(primary_path: str) -> None:
    compressor = OPRMCompressor(model=primary_path, **SETTINGS)
    assert list(compressor.compress_documents([], QUESTION)) == []
    assert list(await compressor.acompress_documents([Document(page_content=" ")], QUESTION)) == []


def test_as_selector_carries_every_setting(primary_path: str) -> None:
    compressor = OPRMCompressor(model=primary_path, chunk_tokens=32, chunk_overlap=4, boundary="sentence",
                                top_k=3, criterion="question_likelihood", idk_word="Unknown", cache=False)
    selector = compressor.as_selector()
    assert selector.core_options() == compressor.core_options()
    assert selector.model == compressor.model
