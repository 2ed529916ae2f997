"""OPRMQueryEngine: retriever-free answers from the winning state, with citations."""

from __future__ import annotations

from typing import Any, List

import pytest
from llama_index.core import SummaryIndex, VectorStoreIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.schema import Document, TextNode

from llama_index.postprocessor.oprm import OPRMQueryEngine
from oprm_rag import OPRMSelector

CHUNK = 24
N = 8


def documents(texts: List[str]) -> List[Document]:
    return [Document(text=t, id_=f"doc-{i}", metadata={"title": f"doc {i}"}) for i, t in enumerate(texts)]


def engine(lm: Any, texts: List[str], **kwargs: Any) -> OPRMQueryEngine:
    return OPRMQueryEngine.from_documents(documents(texts), model=lm, chunk_tokens=CHUNK, max_new_tokens=N,
                                          idk_filter=False, **kwargs)


def test_answer_is_decoded_from_the_winning_state(lm, docs, question):
    qe = engine(lm, docs, cache=False)
    prefilled = lm.counters["prefill_tokens"]
    resp = qe.query(question)
    ran = lm.counters["prefill_tokens"] - prefilled
    assert isinstance(resp, Response)
    # every token the model read was scoring work: the answer did not prefill again
    assert ran == resp.metadata["oprm_usage"]["input_tokens"]
    ref_sel = OPRMSelector(lm, chunk_tokens=CHUNK, idk_filter=False, cache=False)
    ref = ref_sel.answer(question, docs, max_new_tokens=N)
    assert resp.response == ref.text
    [src] = resp.source_nodes
    assert src.score == pytest.approx(-ref.chunk.entropy, abs=1e-5)
    assert src.node.metadata["oprm_char_start"] == ref.chunk.char_start
    assert src.node.get_content() == ref.chunk.text
    # a chunk that is part of a document points to it; a chunk that is the whole document is it
    doc_id = qe.nodes[ref.chunk.doc_index].node_id
    if ref.chunk.char_start == 0 and ref.chunk.char_end == len(docs[ref.chunk.doc_index]):
        assert src.node.node_id == doc_id
    else:
        assert src.node.ref_doc_id == doc_id
    assert len(resp.metadata["oprm_chunks"]) == len(ref.chunks)


def test_top_n_answers_from_several_chunks(lm, docs, question):
    resp = engine(lm, docs, top_n=2).query(question)
    ref = OPRMSelector(lm, chunk_tokens=CHUNK, idk_filter=False, top_k=2).answer(question, docs, max_new_tokens=N)
    assert resp.response == ref.text
    assert [s.node.metadata["oprm_char_start"] for s in resp.source_nodes] == [c.char_start for c in ref.selected]


def test_streaming_answer(lm, docs, question):
    full = engine(lm, docs).query(question)
    resp = engine(lm, docs, streaming=True).query(question)
    assert isinstance(resp, StreamingResponse)
    assert [s.node.node_id for s in resp.source_nodes] == [s.node.node_id for s in full.source_nodes]
    pieces = list(resp.response_gen)
    assert "".join(pieces) == full.response
    assert resp.metadata["oprm_usage"]["output_tokens"] == full.metadata["oprm_usage"]["output_tokens"]


def test_summary_mode_uses_every_chunk(lm, docs, question):
    ref = OPRMSelector(lm, chunk_tokens=CHUNK, idk_filter=False).summarize(docs, question, max_new_tokens=N)
    qe = engine(lm, docs, response_mode="summary")
    resp = qe.query(question)
    assert resp.response == ref.text
    assert len(resp.source_nodes) == len(ref.chunks) > len(docs)
    ids = [n.node_id for n in qe.nodes]
    order = [(ids.index(s.node.metadata["oprm_source_node_id"]), s.node.metadata["oprm_char_start"])
             for s in resp.source_nodes]
    assert order == sorted(order) and len(set(order)) == len(order)  # every chunk once, document order
    assert [s.score for s in resp.source_nodes] == pytest.approx([-c.entropy for c in ref.chunks], abs=1e-5)
    assert resp.metadata["oprm_parts"] == ref.parts
    streamed = engine(lm, docs, response_mode="summary", streaming=True).query(question)
    assert streamed.source_nodes == []  # filled in when the stream ends
    assert "".join(streamed.response_gen) == ref.text
    assert len(streamed.source_nodes) == len(ref.chunks)


def test_no_eligible_chunk_answers_the_idk_word_and_says_why(lm, docs, question):
    resp = engine(lm, docs, entropy_threshold=-1.0).query(question)  # no chunk can pass
    assert resp.response == lm.prompt.idk_word
    assert resp.source_nodes == [] and not resp.metadata["oprm_all_idk"]
    assert "entropy threshold" in resp.metadata["oprm_no_answer_reason"]


@pytest.mark.asyncio
async def test_async_query_and_async_streaming(lm, docs, question):
    full = engine(lm, docs).query(question)
    resp = await engine(lm, docs).aquery(question)
    assert resp.response == full.response
    stream = await engine(lm, docs, streaming=True).aquery(question)
    assert isinstance(stream, AsyncStreamingResponse)
    assert [s.node.node_id for s in stream.source_nodes] == [s.node.node_id for s in full.source_nodes]
    assert "".join([p async for p in stream.response_gen]) == full.response
    summary = await engine(lm, docs, response_mode="summary").aquery(question)
    assert summary.response == engine(lm, docs, response_mode="summary").query(question).response


def test_from_index(lm, docs, question):
    nodes = [TextNode(text=t, metadata={"title": f"node {i}"}) for i, t in enumerate(docs)]
    direct = OPRMQueryEngine(model=lm, nodes=nodes, chunk_tokens=CHUNK, max_new_tokens=N, idk_filter=False)
    expected = direct.query(question)
    for index in (SummaryIndex(nodes), VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))):
        qe = OPRMQueryEngine.from_index(index, model=lm, chunk_tokens=CHUNK, max_new_tokens=N, idk_filter=False)
        assert [n.node_id for n in qe.nodes] == [n.node_id for n in nodes]
        resp = qe.query(question)
        assert resp.response == expected.response
        assert [s.node.node_id for s in resp.source_nodes] == [s.node.node_id for s in expected.source_nodes]


def test_no_text_is_an_error(lm, question):
    with pytest.raises(ValueError):
        OPRMQueryEngine(model=lm, nodes=[TextNode(text="  ")]).query(question)
